"""The ControlNet accordion of txt2img and img2img: `control_net_unit_count` units (the option, read when the
UI is built) with sd-webui-controlnet's controls, the preprocessor preview, the `ControlUnit`s a request
carries, and a pasted infotext's `ControlNet N` entries.

A unit's controls sit in the page's dict under `_controlnet:<index>:<ControlUnit field>` (plus `enabled`
and the UI-only `refresh`, `preview`, `preview_image`).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from backend import annotators, control_maps, control_preprocessors, infotext
from backend.control_units import (
    CONTROL_MODES,
    HR_OPTIONS,
    RESIZE_MODES,
    UNION_CONTROL_TYPES,
    ControlUnit,
    union_type_index,
    units_from_infotext,
)
from backend.errors import EaselError, InputError
from backend.request import MAX_CONTROL_UNITS
from backend.settings import Settings

NO_MODEL = "None"
UNKNOWN_UNION_TYPE = "Unknown"  # a union ControlNet takes its control type from the preprocessor
SLIDERS = ("processor_res", "threshold_a", "threshold_b")  # follow the chosen module's sliders
CHOICES = {"control_mode": CONTROL_MODES, "resize_mode": RESIZE_MODES, "hr_option": HR_OPTIONS}
# The fields a pasted infotext sets (all but the image and the mask), and those a request reads.
PASTED = ("enabled", "module", "model", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode",
          "pixel_perfect", "hr_option", "union_control_type", *SLIDERS)
REQUEST_FIELDS = (*PASTED, "image", "mask")


def key(index: int, name: str) -> str:
    return f"_controlnet:{index}:{name}"


def unit_count(page: dict[str, Any]) -> int:
    """The units a built page has (the option may have changed since: it takes effect at restart)."""
    return sum(1 for index in range(MAX_CONTROL_UNITS) if key(index, "enabled") in page)


# -- building ----------------------------------------------------------------------------------------
def controlnet_panel(ui, c: dict[str, Any], mode: str) -> None:
    """The accordion with one tab per unit; hires option only in txt2img (img2img has no hires pass)."""
    titles = ui.ctx.manager.controlnets.library.titles()
    with gr.Accordion("ControlNet", open=False, elem_id=f"{mode}_controlnet"):
        with gr.Tabs():
            for index in range(ui.ctx.options.control_net_unit_count):
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
        add("union_control_type", gr.Dropdown, [UNKNOWN_UNION_TYPE, *UNION_CONTROL_TYPES], value=UNKNOWN_UNION_TYPE,
            label="Union control type", info="For union ControlNets only; Unknown: the preprocessor's")
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


def slider_props(module: str, values: dict[str, Any] | None = None, pixel_perfect: bool = False) -> list[dict[str, Any]]:
    """The processor resolution and threshold sliders' properties for `module`: label, range and value
    (`values` by field name when in range, else the module's default), or hidden when it has none. Pixel
    perfect computes the resolution: its slider is hidden too (sd-webui-controlnet's), its values kept."""
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
                      "step": slider.step, "value": value,
                      "visible": not (pixel_perfect and name == "processor_res")})
    return props


def resolution_visible(module: str | None, pixel_perfect: bool) -> bool:
    """Whether the resolution slider shows: the module has one and pixel perfect does not compute it."""
    return control_preprocessors.get_module(module or "none").resolution is not None and not pixel_perfect


def module_changed(module: str | None, pixel_perfect: bool) -> list[dict[str, Any]]:
    """The sliders' updates when the user picks a module: its sliders at their defaults."""
    return [gr.update(**props) for props in slider_props(module or "none", pixel_perfect=bool(pixel_perfect))]


def pixel_perfect_changed(module: str | None, pixel_perfect: bool) -> dict[str, Any]:
    """The resolution slider's update when pixel perfect is turned on or off (its value stays)."""
    return gr.update(visible=resolution_visible(module, bool(pixel_perfect)))


# -- events ------------------------------------------------------------------------------------------
def wire_controlnet(ui, mode: str) -> None:
    c, library = ui.pages[mode], ui.ctx.manager.controlnets.library
    models = [c[key(index, "model")] for index in range(unit_count(c))]

    def refresh(*current):
        library.refresh()
        choices = [NO_MODEL, *library.titles()]
        return [gr.Dropdown(choices=choices, value=value if value in choices else NO_MODEL) for value in current]

    for index in range(unit_count(c)):
        c[key(index, "refresh")].click(refresh, inputs=models, outputs=models, queue=False, api_visibility="private")
        sliders = [c[key(index, name)] for name in SLIDERS]
        module, pixel_perfect = c[key(index, "module")], c[key(index, "pixel_perfect")]
        # Module: `input`, not `change`: a pasted module arrives with its own slider values, which must stay.
        # Each event reads the other control, so the resolution slider is right whichever changed last;
        # pixel perfect's `change` also follows a paste, and sets only the visibility.
        module.input(module_changed, inputs=[module, pixel_perfect], outputs=sliders, queue=False,
                     api_visibility="private")
        pixel_perfect.change(pixel_perfect_changed, inputs=[module, pixel_perfect], outputs=sliders[0], queue=False,
                             api_visibility="private")
        _wire_preview(c, mode, index, ui.ctx.settings)


def _wire_preview(c: dict[str, Any], mode: str, index: int, settings: Settings) -> None:
    inputs = [c[key(index, name)] for name in ("image", "mask", "module", *SLIDERS, "pixel_perfect", "resize_mode")]
    init_image = c["_image"] if mode == "img2img" else gr.State(None)  # a unit without an image: img2img's

    def preview(image, mask, module, processor_res, threshold_a, threshold_b, pixel_perfect, resize_mode, init,
                width, height):
        image = image if image is not None else init
        if image is None:
            raise gr.Error(f"ControlNet unit {index}: upload a control image to preview")
        values = unit_slider_values(module, dict(processor_res=processor_res, threshold_a=threshold_a,
                                                 threshold_b=threshold_b))
        try:
            values["processor_res"] = preview_resolution(values["processor_res"], pixel_perfect, image.size,
                                                         (int(width), int(height)), resize_mode)
            weights = annotators.weights_for(module, settings)  # a model-based module: downloaded on first use
            return control_preprocessors.run_preprocessor(module, image, values["processor_res"], values["threshold_a"],
                                                          values["threshold_b"], mask=mask, strict=False, weights=weights)
        except EaselError as exc:
            raise gr.Error(f"ControlNet unit {index}: {exc}") from exc

    c[key(index, "preview")].click(preview, inputs=[*inputs, init_image, c["width"], c["height"]],
                                   outputs=c[key(index, "preview_image")], api_visibility="private")


def preview_resolution(processor_res: int, pixel_perfect: bool, image_size: tuple[int, int],
                       size: tuple[int, int], resize_mode: str) -> int:
    """The resolution the preview runs at: with pixel perfect, the one generation computes for the page's
    size (width, height); else the slider's (-1: the module has none)."""
    if not pixel_perfect or processor_res == -1:
        return processor_res
    return control_maps.pixel_perfect_resolution(image_size, control_maps.latent_aligned(size), resize_mode)


def unit_slider_values(module: str, values: dict[str, Any]) -> dict[str, Any]:
    """The slider values as a unit takes them: -1 (the module's default) for a slider the module lacks,
    which keeps a hidden slider's stale value out of the request and its infotext."""
    spec = control_preprocessors.get_module(module)
    present = (spec.resolution, spec.threshold_a, spec.threshold_b)
    return {name: (values[name] if slider is not None and values.get(name) is not None else -1)
            for name, slider in zip(SLIDERS, present)}


# -- the request -------------------------------------------------------------------------------------
def request_inputs(c: dict[str, Any]) -> set:
    return {c[key(index, name)] for index in range(unit_count(c)) for name in REQUEST_FIELDS if key(index, name) in c}


def control_units(page: dict[str, Any], values: dict[Any, Any], mode: str) -> tuple[ControlUnit, ...]:
    """The enabled units with a model, in order, with the values as the user set them."""
    units = []
    for index in range(unit_count(page)):
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
        threshold_a=float(sliders["threshold_a"]), threshold_b=float(sliders["threshold_b"]),
        union_control_type=fields.get("union_control_type") or UNKNOWN_UNION_TYPE, position=index,
    )


# -- pasting -----------------------------------------------------------------------------------------
def pasted_names(page: dict[str, Any]) -> list[str]:
    """The unit controls a pasted infotext sets, as keys of the page."""
    return [key(index, name) for index in range(unit_count(page)) for name in PASTED if key(index, name) in page]


def pasted_values(text: str, count: int) -> dict[str, Any]:
    """Each of `count` units' values from the infotext's `ControlNet N` entry (sliders as updates that also
    set their label, range and visibility); a unit without an entry is turned off, as the image was made
    without it. Entries beyond the units shown are left out, with a warning."""
    entries = units_from_infotext(infotext.parse_infotext(text))
    if len(entries) > count:
        gr.Warning(f"The infotext has {len(entries)} ControlNet units and the page shows {count}: units {count} "
                   f"and on were left out (Settings, ControlNet: the unit number; requires restart)")
    values: dict[str, Any] = {}
    for index in range(count):
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
    union = union_type_index(str(entry.get("union_control_type", "")))
    values["union_control_type"] = UNION_CONTROL_TYPES[union] if union is not None else UNKNOWN_UNION_TYPE
    for name, props in zip(SLIDERS, slider_props(module, entry, values["pixel_perfect"])):
        values[name] = gr.update(**props)
    return values
