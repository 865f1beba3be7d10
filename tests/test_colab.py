"""The Colab notebook: valid notebook JSON, the commands it runs are the README's, and it downloads what is ticked."""

import json
import re
from pathlib import Path

import pytest

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


# The download cell's checkboxes and the file each one must fetch into models/ (a user's report: with
# several boxes ticked the table was keyed by the box values, True == True, so only the last one came).
DOWNLOAD_TARGETS = {
    "SD15": "Stable-diffusion/v1-5-pruned-emaonly.safetensors",
    "SDXL": "Stable-diffusion/sd_xl_base_1.0.safetensors",
    "REAL_ESRGAN_X4PLUS": "ESRGAN/RealESRGAN_x4plus.pth",
    "GFPGAN_V14": "GFPGAN/GFPGANv1.4.pth",
}
CHECKBOX = re.compile(r'^(\w+) = (?:True|False)(\s*#@param \{type:"boolean"\})$', re.M)


def code_cell_titled(notebook: dict, title: str) -> str:
    sources = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    return next(s for s in sources if s.startswith(f"#@title {title}"))


def run_cell(source: str, ticked: set[str], data_dir: str) -> list[str]:
    """Run a cell the way Colab does after the form is filled in; return the shell lines it ran."""
    # 1. The form rewrites each checkbox's assignment in the source
    source = CHECKBOX.sub(lambda m: f"{m[1]} = {m[1] in ticked}{m[2]}", source)
    # 2. IPython expands {expressions} in `!` and `%` lines and runs them; here they are recorded
    source = re.sub(r"^(\s*)([!%].*)$", lambda m: f"{m[1]}_shell(f{m[2][1:]!r})", source, flags=re.M)
    ran = []
    exec(compile(source, "download cell", "exec"), {"DATA_DIR": data_dir, "_shell": ran.append})
    return ran


@pytest.mark.parametrize("ticked", [
    set(),
    {"SDXL"},
    {"SD15", "SDXL"},
    {"SD15", "REAL_ESRGAN_X4PLUS", "GFPGAN_V14"},
    set(DOWNLOAD_TARGETS),
])
def test_download_cell_fetches_every_ticked_model_once(ticked):
    source = code_cell_titled(json.loads(NOTEBOOK.read_text()), "Download models")
    assert [m[1] for m in CHECKBOX.finditer(source)] == list(DOWNLOAD_TARGETS)

    ran = run_cell(source, ticked, data_dir="/data")

    requested = []
    for command in ran:
        wget = re.fullmatch(r'wget -q --show-progress -c -O "/data/models/([^"]+)" "(https://[^"]+)"', command)
        assert wget, command
        target, url = wget.groups()
        assert url.rsplit("/", 1)[1] == target.rsplit("/", 1)[1], (target, url)
        requested.append(target)
    assert sorted(requested) == sorted(DOWNLOAD_TARGETS[name] for name in ticked)
