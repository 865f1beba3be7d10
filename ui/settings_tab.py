"""The Settings tab: the options, checked and applied through `Runtime.apply`.
"""

from __future__ import annotations

import gradio as gr

from backend.errors import InputError
from backend.options import FP8_STORAGE, VAE_TILING
from backend.request import EMPHASIS_MODES, MAX_CONTROL_UNITS, RANDN_SOURCES
from backend.sampler_settings import UNIPC_SKIP_TYPES, UNIPC_VARIANTS
from backend.samplers import SAMPLER_NAMES
from ui.context import error_html


def settings_tab(ui) -> None:
    ctx = ui.ctx
    o = ctx.options
    with gr.Column():
        controls = {
            "save_images": gr.Checkbox(o.save_images, label="Save every generated image"),
            "outdir_txt2img": gr.Textbox(o.outdir_txt2img, label="txt2img output folder (empty: outputs/txt2img-images)"),
            "outdir_img2img": gr.Textbox(o.outdir_img2img, label="img2img output folder (empty: outputs/img2img-images)"),
            "filename_pattern": gr.Textbox(o.filename_pattern, label="File name pattern, after the number "
                                           "([seed], [prompt], [prompt_words], [model_name], [sampler], [steps], "
                                           "[cfg], [width], [height], [datetime], [date])"),
            "save_txt": gr.Checkbox(o.save_txt, label="Also write a .txt file with the parameters beside each image"),
            "checkpoint_cache": gr.Slider(1, 8, value=o.checkpoint_cache, step=1, label="Checkpoints kept in memory"),
            "vae_tiling": gr.Radio(list(VAE_TILING), value=o.vae_tiling, label="VAE in tiles (large images on "
                                   "small GPUs): Automatic = above 2048x2048 and after running out of memory"),
            "torch_compile": gr.Checkbox(o.torch_compile, label="torch.compile the UNet / transformer (the first "
                                         "image of each size compiles, minutes; later ones are faster)"),
            "channels_last": gr.Checkbox(o.channels_last, label="Channels-last memory layout for the UNet"),
            "fp8_storage": gr.Radio(list(FP8_STORAGE), value=o.fp8_storage, label="FP8 weight: store the UNet's / "
                                    "transformer's linear weights in fp8, half the memory (Enable for SDXL also "
                                    "covers FLUX.1 and SD 3.5); loaded models reload"),
            "default_sampler": gr.Dropdown(list(SAMPLER_NAMES), value=o.default_sampler, label="Default sampler"),
            "default_steps": gr.Slider(1, 150, value=o.default_steps, step=1, label="Default steps"),
            "default_cfg_scale": gr.Slider(1, 30, value=o.default_cfg_scale, step=0.5, label="Default CFG scale"),
            "emphasis": gr.Radio(list(EMPHASIS_MODES), value=o.emphasis, label="Emphasis mode: how (word:1.2) "
                                 "weights apply (Original: scale, then restore the mean; No norm: scale only; "
                                 "Ignore: drop weights; None: brackets are plain text)"),
            "randn_source": gr.Radio(list(RANDN_SOURCES), value=o.randn_source, label="Random number source: GPU "
                                     "(the device's; A1111's default), CPU (the same on every machine), NV (an "
                                     "NVIDIA GPU's noise on any machine)"),
            "eta_noise_seed_delta": gr.Number(o.eta_noise_seed_delta, precision=0, minimum=0,
                                              label="Eta noise seed delta (ENSD): per-step noise seeded seed + this "
                                              "(31337 in many shared infotexts; 0: off)"),
            "pad_cond_uncond": gr.Checkbox(o.pad_cond_uncond, label="Pad prompt/negative prompt: run prompts of "
                                           "different lengths as one batch (faster; A1111's non-default setting)"),
            "use_old_scheduling": gr.Checkbox(o.use_old_scheduling, label="Old prompt editing timelines (A1111 "
                                              "before 1.7: the hires pass starts [from:to:when] over)"),
            "same_wildcards": gr.Checkbox(o.same_wildcards, label="Same wildcard picks for every image of a batch"),
            "live_preview_every": gr.Slider(0, 50, value=o.live_preview_every, step=1,
                                            label="Live preview every N steps (0: off)"),
            "face_restoration_model": gr.Radio(["CodeFormer", "GFPGAN"], value=o.face_restoration_model,
                                               label="Face restoration model"),
            "code_former_weight": gr.Slider(0, 1, value=o.code_former_weight, step=0.01,
                                            label="CodeFormer weight (0 = strongest, 1 = weakest)"),
            "save_images_before_face_restoration": gr.Checkbox(
                o.save_images_before_face_restoration, label="Also save each image before face restoration"),
            "face_restoration_unload": gr.Checkbox(o.face_restoration_unload,
                                                   label="Free the face restoration model after each use"),
            "upscaler_unload": gr.Checkbox(o.upscaler_unload, label="Free upscaler models after each use"),
            "ESRGAN_tile": gr.Slider(0, 512, value=o.ESRGAN_tile, step=16,
                                     label="Upscaler tile size (0: no tiling; smaller uses less memory)"),
            "ESRGAN_tile_overlap": gr.Slider(0, 48, value=o.ESRGAN_tile_overlap, step=1,
                                             label="Upscaler tile overlap, pixels"),
            "xyz_max_cells": gr.Number(o.xyz_max_cells, precision=0, label="X/Y/Z plot: most cells in a plot"),
            "xyz_max_megapixels": gr.Number(o.xyz_max_megapixels, precision=0,
                                            label="X/Y/Z plot: largest grid image, megapixels"),
        }
        with gr.Accordion("Sampler parameters (A1111's; infotexts record them when not at their defaults)",
                          open=False):
            controls.update(sampler_controls(o))
        with gr.Accordion("ControlNet", open=False, elem_id="settings_controlnet"):
            controls.update(controlnet_controls(o))
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit")
        result = gr.HTML(elem_id="settings_result")

    def apply_settings(values: dict):
        try:
            ctx.runtime.apply(typed_values({name: values[component] for name, component in controls.items()}))
        except InputError as exc:
            return error_html(f"Not saved: {exc}")
        return f"<div>Saved to {ctx.runtime.options_path}; applied.</div>"

    apply.click(apply_settings, inputs=set(controls.values()), outputs=result, queue=False,
                api_visibility="private")


_WHOLE_NUMBERS = ("checkpoint_cache", "default_steps", "live_preview_every", "ESRGAN_tile", "ESRGAN_tile_overlap",
                  "xyz_max_cells", "xyz_max_megapixels", "eta_noise_seed_delta", "uni_pc_order",
                  "control_net_unit_count", "control_net_model_cache_size")


def typed_values(values: dict) -> dict:
    """The controls' values as the options take them: sliders and numbers give floats, some options ints."""
    typed = dict(values)
    for name in _WHOLE_NUMBERS:
        if name in typed:
            typed[name] = int(typed[name])
    for name in ("default_cfg_scale", "code_former_weight", *_SAMPLER_NUMBERS):
        if name in typed:
            typed[name] = float(typed[name])
    return typed


_SAMPLER_NUMBERS = {
    "eta_ancestral": "Eta for the k-diffusion ancestral and SDE samplers (A1111's default 1)",
    "eta_ddim": "Eta for DDIM (0: deterministic)",
    "s_churn": "Sigma churn (Euler, Heun, DPM2)",
    "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax (0: infinity)",
    "s_noise": "Sigma noise: scale of the per-step noise",
    "sigma_min": "Schedule min sigma (0: the model's)", "sigma_max": "Schedule max sigma (0: the model's)",
    "rho": "Schedule rho of Karras / Polyexponential (0: theirs, 7 / 1)",
    "beta_dist_alpha": "Beta schedule alpha", "beta_dist_beta": "Beta schedule beta",
}


def sampler_controls(o) -> dict:
    """Controls for A1111's sampler parameters (`backend.sampler_settings`)."""
    controls = {name: gr.Number(getattr(o, name), label=label) for name, label in _SAMPLER_NUMBERS.items()}
    controls.update(
        always_discard_next_to_last_sigma=gr.Checkbox(o.always_discard_next_to_last_sigma,
                                                      label="Always discard the next-to-last sigma"),
        uni_pc_variant=gr.Radio(list(UNIPC_VARIANTS), value=o.uni_pc_variant, label="UniPC variant"),
        uni_pc_skip_type=gr.Radio(list(UNIPC_SKIP_TYPES), value=o.uni_pc_skip_type, label="UniPC skip type"),
        uni_pc_order=gr.Slider(1, 5, value=o.uni_pc_order, step=1, label="UniPC order"),
        uni_pc_lower_order_final=gr.Checkbox(o.uni_pc_lower_order_final, label="UniPC: lower order at the end"),
    )
    return controls


def controlnet_controls(o) -> dict:
    """sd-webui-controlnet's options of the same names."""
    return {
        "control_net_unit_count": gr.Slider(1, MAX_CONTROL_UNITS, value=o.control_net_unit_count, step=1,
                                            label="Multi-ControlNet: ControlNet unit number (requires restart)"),
        "control_net_model_cache_size": gr.Slider(1, 8, value=o.control_net_model_cache_size, step=1,
                                                  label="ControlNet models kept in memory (model cache size; "
                                                  "the least recently used are freed first)"),
    }
