"""The ControlNet accordion of txt2img and img2img: three units with sd-webui-controlnet's controls, the
preprocessor preview, the `ControlUnit`s a request carries, and a pasted infotext's `ControlNet N` entries.

A unit's controls sit in the page's dict under `_controlnet:<index>:<ControlUnit field>` (plus `enabled`
and the UI-only `refresh`, `preview`, `preview_image`).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from backend import annotators, control_preprocessors, infotext
from backend.control_units import CONTROL_MODES, HR_OPTIONS, RESIZE_MODES, ControlUnit, units_from_infotext
from backend.errors import EaselError, InputError
from backend.settings import Settings

UNIT_COUNT = 3  # sd-webui-controlnet's default `control_net_unit_count`
NO_MODEL = "None"
SLIDERS = ("processor_res", "threshold_a", "threshold_b")  # follow the chosen module's sliders
CHOICES = {"control_mode": CONTROL_MODES, "resize_mode": RESIZE_MODES, "hr_option": HR_OPTIONS}
# The fields a pasted infotext sets (all but the image and the mask), and those a request reads.
PASTED = ("enabled", "module", "model", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode",
          "pixel_perfect", "hr_option", *SLIDERS)
REQUEST_FIELDS = (*PASTED, "image", "mask")


def key(index: int, name: str) -> str:
    return f"_controlnet:{index}:{name}"


# -- building ----------------------------------------------------------------------------------------
def controlnet_panel(ui, c: dict[str, Any], mode: str) -> None:
    """The accordion with one tab per unit; hires option only in txt2img (img2img has no hires pass)."""
    titles = ui.ctx.manager.controlnets.library.titles()
    with gr.Accordion("ControlNet", open=False, elem_id=f"{mode}_controlnet"):
        with gr.Tabs():
            for index in range(UNIT_COUNT):
                with gr.Tab(f"ControlNet Unit {index}", id=f"{mode}_controlnet_unit{index}"):
                    _unit_controls(c, mode, index, titles)


def _unit_controls(c: dict[str, Any], mode: str, index: int, titles: list[str]) -> None:
    def add(name: str, make, *args, elem: str | None = None, **kwargs) -> None:
        c[key(index, name)] = make(*args, elem_id=f"{mode}_controlnet_unit{index}_{elem or name}", **kwargs)

    image_label = "Control image (empty: the img2img image)" if mode == "img2img" else "Control image"
    with gr.Row():
        add("image", gr.Image, label=image_label, type="pil", image_mode="RGB", sources=["upload", "clipboard"],
            format="png", placeholder="An image to preprocess, or an edited map with preprocessor none")
        add("mask", gr.Image, label="Mask (optional; white = active)", type="pil", image_mode="L",
            sources=["upload", "clipboard"], format="png")
        add("preview_image", gr.Image, label="Preprocessor preview", type="pil", format="png", interactive=False,
            buttons=["download"])
    with gr.Row():
        add("enabled", gr.Checkbox, False, label="Enable", elem="enable")
        add("pixel_perfect", gr.Checkbox, False, label="Pixel Perfect")
        add("preview", gr.Button, "💥 Preview", size="sm")
    with gr.Row():
        modules = list(zip(control_preprocessors.module_list(True), control_preprocessors.module_list(False)))
        add("module", gr.Dropdown, modules, value="none", label="Preprocessor")
        # Custom values: a pasted infotext may name a model that is not installed; Generate then says so.
        add("model", gr.Dropdown, [NO_MODEL, *titles], value=NO_MODEL, label="Model", allow_custom_value=True)
        add("refresh", gr.Button, "🔄", scale=0, min_width=40)
    add("weight", gr.Slider, 0, 2, value=1, step=0.05, label="Control Weight")
    with gr.Row():
        add("guidance_start", gr.Slider, 0, 1, value=0, step=0.01, label="Starting Control Step")
        add("guidance_end", gr.Slider, 0, 1, value=1, step=0.01, label="Ending Control Step")
    with gr.Row():
        for name, props in zip(SLIDERS, slider_props("none")):
            add(name, gr.Slider, **{"label": name.replace("_", " ").title(), "visible": False, **props})
    add("control_mode", gr.Radio, list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control Mode")
    add("resize_mode", gr.Radio, list(RESIZE_MODES), value=RESIZE_MODES[1], label="Resize Mode")
    if mode == "txt2img":
        add("hr_option", gr.Radio, list(HR_OPTIONS), value=HR_OPTIONS[0], label="Hires-Fix Option")


def slider_props(module: str, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The processor resolution and threshold sliders' properties for `module`: label, range and value
    (`values` by field name when in range, else the module's default), or hidden when it has none."""
    spec = control_preprocessors.get_module(module)
    props = []
    for name, slider in zip(SLIDERS, (spec.resolution, spec.threshold_a, spec.threshold_b)):
        if slider is None:
            props.append({"visible": False})
            continue
        value = (values or {}).get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not \
                slider.minimum <= value <= slider.maximum:
            value = slider.value
        props.append({"label": slider.name, "minimum": slider.minimum, "maximum": slider.maximum,
                      "step": slider.step, "value": value, "visible": True})
    return props


# -- events ------------------------------------------------------------------------------------------
def wire_controlnet(ui, mode: str) -> None:
    c, library = ui.pages[mode], ui.ctx.manager.controlnets.library
    models = [c[key(index, "model")] for index in range(UNIT_COUNT)]

    def refresh(*current):
        library.refresh()
        choices = [NO_MODEL, *library.titles()]
        return [gr.Dropdown(choices=choices, value=value if value in choices else NO_MODEL) for value in current]

    for index in range(UNIT_COUNT):
        c[key(index, "refresh")].click(refresh, inputs=models, outputs=models, queue=False, api_visibility="private")
        sliders = [c[key(index, name)] for name in SLIDERS]
        # `input`, not `change`: a pasted module arrives with its own slider values, which must stay.
        c[key(index, "module")].input(lambda module: [gr.update(**p) for p in slider_props(module)],
                                      inputs=c[key(index, "module")], outputs=sliders, queue=False,
                                      api_visibility="private")
        _wire_preview(c, mode, index, ui.ctx.settings)


def _wire_preview(c: dict[str, Any], mode: str, index: int, settings: Settings) -> None:
    inputs = [c[key(index, name)] for name in ("image", "mask", "module", *SLIDERS)]
    init_image = c["_image"] if mode == "img2img" else gr.State(None)  # a unit without an image: img2img's

    def preview(image, mask, module, processor_res, threshold_a, threshold_b, init):
        image = image if image is not None else init
        if image is None:
            raise gr.Error(f"ControlNet unit {index}: upload a control image to preview")
        values = unit_slider_values(module, dict(processor_res=processor_res, threshold_a=threshold_a,
                                                 threshold_b=threshold_b))
        try:
            weights = annotators.weights_for(module, settings)  # a model-based module: downloaded on first use
            return control_preprocessors.run_preprocessor(module, image, values["processor_res"], values["threshold_a"],
                                                          values["threshold_b"], mask=mask, strict=False, weights=weights)
        except EaselError as exc:
            raise gr.Error(f"ControlNet unit {index}: {exc}") from exc

    c[key(index, "preview")].click(preview, inputs=[*inputs, init_image], outputs=c[key(index, "preview_image")],
                                   api_visibility="private")


def unit_slider_values(module: str, values: dict[str, Any]) -> dict[str, Any]:
    """The slider values as a unit takes them: -1 (the module's default) for a slider the module lacks,
    which keeps a hidden slider's stale value out of the request and its infotext."""
    spec = control_preprocessors.get_module(module)
    present = (spec.resolution, spec.threshold_a, spec.threshold_b)
    return {name: (values[name] if slider is not None and values.get(name) is not None else -1)
            for name, slider in zip(SLIDERS, present)}


# -- the request -------------------------------------------------------------------------------------
def request_inputs(c: dict[str, Any]) -> set:
    return {c[key(index, name)] for index in range(UNIT_COUNT) for name in REQUEST_FIELDS if key(index, name) in c}


def control_units(page: dict[str, Any], values: dict[Any, Any], mode: str) -> tuple[ControlUnit, ...]:
    """The enabled units with a model, in order, with the values as the user set them."""
    units = []
    for index in range(UNIT_COUNT):
        fields = {name: values[page[key(index, name)]] for name in REQUEST_FIELDS
                  if key(index, name) in page and page[key(index, name)] in values}
        unit = unit_from_fields(index, fields, mode)
        if unit is not None:
            units.append(unit)
    return tuple(units)


def unit_from_fields(index: int, fields: dict[str, Any], mode: str) -> ControlUnit | None:
    """One unit from its controls' values by field name; None when it is off or has no model."""
    model = fields.get("model") or NO_MODEL
    if not fields.get("enabled") or model == NO_MODEL:
        return None
    if fields.get("image") is None and mode != "img2img":
        raise gr.Error(f"ControlNet unit {index} has no image: upload one to it, or turn the unit off")
    module = fields.get("module") or "none"
    sliders = unit_slider_values(module, fields)
    return ControlUnit(
        model=str(model), module=module, image=fields.get("image"), mask=fields.get("mask"),
        weight=float(fields.get("weight", 1.0)), guidance_start=float(fields.get("guidance_start", 0.0)),
        guidance_end=float(fields.get("guidance_end", 1.0)),
        control_mode=fields.get("control_mode") or CONTROL_MODES[0],
        resize_mode=fields.get("resize_mode") or RESIZE_MODES[1], hr_option=fields.get("hr_option") or HR_OPTIONS[0],
        pixel_perfect=bool(fields.get("pixel_perfect")), processor_res=int(sliders["processor_res"]),
        threshold_a=float(sliders["threshold_a"]), threshold_b=float(sliders["threshold_b"]), position=index,
    )


# -- pasting -----------------------------------------------------------------------------------------
def pasted_names(page: dict[str, Any]) -> list[str]:
    """The unit controls a pasted infotext sets, as keys of the page."""
    return [key(index, name) for index in range(UNIT_COUNT) for name in PASTED if key(index, name) in page]


def pasted_values(text: str) -> dict[str, Any]:
    """Each unit's values from the infotext's `ControlNet N` entry (sliders as updates that also set their
    label and range); a unit without an entry is turned off, as the image was made without it."""
    entries = units_from_infotext(infotext.parse_infotext(text))
    values: dict[str, Any] = {}
    for index in range(UNIT_COUNT):
        values[key(index, "enabled")] = index < len(entries)
        if index < len(entries):
            values.update({key(index, name): value for name, value in _pasted_unit(index, entries[index]).items()})
    return values


def _pasted_unit(index: int, entry: dict[str, Any]) -> dict[str, Any]:
    try:
        module = control_preprocessors.get_module(str(entry.get("module", "none"))).name
    except InputError as exc:
        gr.Warning(f"ControlNet unit {index}: {exc}; the preprocessor was set to none")
        module = "none"
    values: dict[str, Any] = {"module": module, "model": str(entry.get("model") or NO_MODEL)}
    for name, default in (("weight", 1.0), ("guidance_start", 0.0), ("guidance_end", 1.0)):
        value = entry.get(name, default)
        values[name] = float(value) if isinstance(value, (int, float)) else default
    values["pixel_perfect"] = entry.get("pixel_perfect") is True
    for name, choices in CHOICES.items():
        if entry.get(name) in choices:
            values[name] = entry[name]
    for name, props in zip(SLIDERS, slider_props(module, entry)):
        values[name] = gr.update(**props)
    return values
