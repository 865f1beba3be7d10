"""The Colab notebook: valid notebook JSON, and the commands it runs are the ones the README documents."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "easel_colab.ipynb"


def shell_commands(notebook: dict) -> list[str]:
    commands = []
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            for line in "".join(cell["source"]).splitlines():
                if line.strip().startswith("!"):
                    commands.append(line.strip()[1:])
    return commands


def test_notebook_is_valid_and_launches_with_share_and_a_password():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4 and notebook["cells"]
    for cell in notebook["cells"]:
        assert cell["cell_type"] in {"code", "markdown"} and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            compile(re.sub(r"^(\s*)[!%].*$", r"\1pass", "".join(cell["source"]), flags=re.M), "cell", "exec")
    source = "".join("".join(c["source"]) for c in notebook["cells"])
    assert "secrets.token_urlsafe" in source and "drive.mount" in source


def test_notebook_commands_are_the_readmes():
    readme = (ROOT / "README.md").read_text()
    colab_section = readme[readme.index("### Colab"):]
    documented = re.search(r"```bash\n(.*?)```", colab_section, re.S).group(1)

    def normalise(command: str) -> str:  # placeholders and Python substitutions compare equal
        command = re.sub(r'"?\{[A-Z_]+\}"?|"?<[^>]+>"?', "X", command)
        return " ".join(command.replace("easel:X", "X").split())

    wanted = [normalise(line) for line in documented.replace("&& cd easel", "").splitlines() if line.strip()]
    ran = [normalise(c) for c in shell_commands(json.loads(NOTEBOOK.read_text())) if not c.startswith("wget")]
    assert wanted == ran
