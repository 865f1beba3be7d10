"""Easel: parse the command line into one `Settings`, build the `Runtime`, run the chosen front end.

    python app.py [global flags] [server flags]   the web UI (http://127.0.0.1:7860)
    python app.py [global flags] generate ...     headless generation; prints image paths
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from backend.images import INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES
from backend.request import RANDN_SOURCES
from backend.samplers import SAMPLER_NAMES, SCHEDULE_TYPES
from backend.settings import PRECISIONS, Settings

logger = logging.getLogger("easel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description="Easel, a Stable Diffusion web UI.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    _add_folder_flags(parser)
    _add_model_flags(parser)
    _add_server_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate_command(commands)
    _add_extras_command(commands)
    detect = commands.add_parser("detect", help="write a ControlNet preprocessor's map of an image")
    detect.add_argument("--module", required=True, help="canny, invert, threshold, lineart_standard, ... ")
    detect.add_argument("--image", type=Path, required=True)
    detect.add_argument("--res", type=int, default=-1, help="processor resolution (default: the module's)")
    detect.add_argument("--threshold-a", type=float, default=-1)
    detect.add_argument("--threshold-b", type=float, default=-1)
    detect.add_argument("--out", type=Path, help="where to write the map (default: <image>-<module>.png)")
    return parser


def _add_folder_flags(parser: argparse.ArgumentParser) -> None:
    paths = parser.add_argument_group("folders (A1111 layout; point them at an existing install to reuse it)")
    paths.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent,
                       help="base folder holding models/, outputs/ and cache/ (default: this folder)")
    paths.add_argument("--ckpt-dir", type=Path, help="checkpoints folder (default: <data-dir>/models/Stable-diffusion)")
    paths.add_argument("--vae-dir", type=Path, help="VAE folder (default: <data-dir>/models/VAE)")
    paths.add_argument("--lora-dir", type=Path, help="LoRA folder (default: <data-dir>/models/Lora)")
    paths.add_argument("--controlnet-dir", type=Path, help="ControlNet folder (default: <data-dir>/models/ControlNet)")
    paths.add_argument("--clip-vision-dir", type=Path,
                       help="CLIP image encoders for IP-Adapters (default: <data-dir>/models/clip_vision)")
    paths.add_argument("--text-encoder-dir", type=Path,
                       help="FLUX.1 / SD 3.5 text encoders (default: <data-dir>/models/text_encoder)")
    paths.add_argument("--embeddings-dir", type=Path, help="embeddings folder (default: <data-dir>/models/embeddings)")
    paths.add_argument("--outdir", type=Path, help="outputs folder (default: <data-dir>/outputs)")
    paths.add_argument("--wildcards-dir", type=Path, help="wildcards folder (default: <data-dir>/wildcards)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and device")
    model.add_argument("--ckpt", help="checkpoint to load first (name, file name or short hash)")
    model.add_argument("--compile", action="store_true", dest="torch_compile",
                       help="torch.compile the UNet / transformer (the first image of each size compiles: slow)")
    model.add_argument("--channels-last", action="store_true", help="channels-last memory layout for the UNet")
    model.add_argument("--text-encoder", action="append", default=[], metavar="NAME",
                       help="a text encoder in models/text_encoder for FLUX.1 / SD 3.5 files that lack theirs "
                            "(repeatable; default: each role's only file there)")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    model.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: fp16 on GPUs, fp32 on the CPU; full: fp32 everywhere")
    model.add_argument("--no-half", action="store_true", help="keep the models in fp32 (fixes NaN/black images)")
    model.add_argument("--no-half-vae", action="store_true", help="keep the VAE in fp32")
    model.add_argument("--medvram", action="store_true", help="keep only the module in use on the GPU")
    model.add_argument("--lowvram", action="store_true", help="stream weights to the GPU layer by layer (slow)")
    model.add_argument("--threads", type=int, help="CPU threads for torch (1 is fastest on a busy machine)")
    model.add_argument("--checkpoint-cache", type=int, default=1, help="checkpoints kept loaded (default 1)")
    model.add_argument("--workers", type=int, default=0, metavar="N",
                       help="generate on N worker replicas on Ray Serve (one per GPU; on the CPU, a share of the "
                            "cores each), routed by checkpoint; needs requirements-cluster.txt")
    model.add_argument("--ray-address", metavar="ADDR",
                       help="run the workers on an existing Ray cluster (auto, HOST:6379 or ray://HOST:10001)")
    model.add_argument("--no-download", action="store_true",
                       help="never download missing standard GFPGAN/CodeFormer/Real-ESRGAN weights on first use")


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("web UI server")
    server.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 (reachable from the network)")
    server.add_argument("--port", type=int, help="port (default 7860, or the next free one)")
    server.add_argument("--share", action="store_true", help="a public gradio.live link (needs the network)")
    server.add_argument("--gradio-auth", metavar="USER:PASS[,USER2:PASS2]", help="require a login")
    server.add_argument("--gradio-auth-path", type=Path, metavar="FILE", help="file with user:password lines")
    server.add_argument("--insecure", action="store_true",
                        help="allow --listen/--share without --gradio-auth / --api-auth (anyone can use the server)")
    server.add_argument("--api", action="store_true", help="serve A1111's REST API (/sdapi/v1) and Easel's job API "
                        "(/easel/v1/jobs) on the same port; docs at /docs")
    server.add_argument("--nowebui", action="store_true", help="serve the API only, without the web UI")
    server.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]", help="HTTP Basic users of the API")
    server.add_argument("--api-admin", metavar="USER[,USER2]",
                        help="API users who may interrupt or cancel any job (others: only their own)")
    server.add_argument("--enable-insecure-extension-access", action="store_true",
                        help="allow installing extensions from the UI on a --listen/--share server")



def _add_generate_command(commands) -> None:
    gen = commands.add_parser("generate", help="generate images headless and print their paths")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--checkpoint", help="checkpoint name (default: --ckpt or the first one found)")
    gen.add_argument("--vae", help="Automatic, None or a file in the VAE folder")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--sampler", help=", ".join(SAMPLER_NAMES))
    gen.add_argument("--schedule-type", help=", ".join(SCHEDULE_TYPES))
    gen.add_argument("--cfg-scale", type=float)
    gen.add_argument("--distilled-cfg-scale", type=float, help="FLUX.1 dev's guidance (Forge's; default 3.5)")
    gen.add_argument("--shift", type=float, help="a flow model's schedule shift (FLUX.1, SD 3.5; default: its own)")
    gen.add_argument("--seed", type=int, help="-1 for random (default)")
    gen.add_argument("--subseed", type=int, help="variation seed")
    gen.add_argument("--subseed-strength", type=float, help="variation strength, 0-1")
    gen.add_argument("--seed-resize-from-w", type=int)
    gen.add_argument("--seed-resize-from-h", type=int)
    gen.add_argument("--width", type=int, help="default: the model's native size")
    gen.add_argument("--height", type=int)
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--batch-count", type=int)
    gen.add_argument("--clip-skip", type=int)
    gen.add_argument("--pad-cond-uncond", action="store_true", default=None,
                     help="pad the shorter of prompt and negative prompt to batch them (A1111's non-default setting)")
    gen.add_argument("--randn-source", choices=RANDN_SOURCES,
                     help="noise: GPU (the device's, A1111's default), CPU, or NV (an NVIDIA GPU's noise anywhere)")
    gen.add_argument("--eta-noise-seed-delta", "--ensd", type=int, metavar="ENSD",
                     help="A1111's eta noise seed delta: per-step noise seeded seed + ENSD (infotext `ENSD`)")
    gen.add_argument("--eta", type=float, help="the sampler's eta (default: the eta_ancestral / eta_ddim options)")
    gen.add_argument("--controlnet", action="append", metavar="SPEC", default=[],
                     help='a ControlNet unit (repeatable): "model=NAME,module=canny,image=edges.png,weight=0.8,'
                          'start=0,end=1" (also mask, mode, resize, res, threshold_a, threshold_b, pixel_perfect, hr)')
    gen.add_argument("--init-image", type=Path, help="img2img: the starting image")
    gen.add_argument("--denoising-strength", type=float)
    gen.add_argument("--resize-mode", choices=RESIZE_MODES)
    gen.add_argument("--mask", type=Path, help="inpaint: white = repaint")
    gen.add_argument("--mask-blur", type=int)
    gen.add_argument("--masked-content", choices=MASKED_CONTENT)
    gen.add_argument("--inpaint-area", choices=INPAINT_AREAS)
    gen.add_argument("--only-masked-padding", type=int)
    gen.add_argument("--invert-mask", action="store_true", default=None)
    gen.add_argument("--no-save", dest="save_images", action="store_false", default=None,
                     help="do not write files (nothing is printed)")
    gen.add_argument("--enable-hr", action="store_true", default=None,
                     help="hires fix: a second pass at --hr-scale times the size (denoised by --denoising-strength)")
    gen.add_argument("--hr-scale", type=float, help="hires fix upscale factor (default 2)")
    gen.add_argument("--hr-resize-x", type=int, help="hires fix target width instead of --hr-scale")
    gen.add_argument("--hr-resize-y", type=int, help="hires fix target height instead of --hr-scale")
    gen.add_argument("--hr-upscaler", help="Latent (default), Latent (bicubic), ..., or an upscaler name")
    gen.add_argument("--hr-second-pass-steps", type=int, help="hires steps (default: --steps)")
    gen.add_argument("--hr-sampler", help="hires sampler (default: --sampler)")
    gen.add_argument("--hr-prompt", help="hires prompt (default: --prompt)")
    gen.add_argument("--hr-negative-prompt", help="hires negative prompt (default: --negative-prompt)")
    gen.add_argument("--restore-faces", action="store_true", default=None, help="restore faces after decoding")
    gen.add_argument("--face-restorer", choices=("CodeFormer", "GFPGAN"), help="default CodeFormer")
    gen.add_argument("--face-visibility", type=float, help="restored image blended over the original, 0-1 (default 1)")
    gen.add_argument("--codeformer-weight", type=float, help="0 = strongest, 1 = weakest (default 0.5)")
    gen.add_argument("--save-before-face-restoration", action="store_true", default=None,
                     help="also save each image as it was before face restoration")
    gen.add_argument("--upscaler", help="upscale each image after decoding: Lanczos, Nearest, R-ESRGAN 4x+, ...")
    gen.add_argument("--upscale-by", type=float, help="factor for --upscaler (default 2)")


def _add_extras_command(commands) -> None:
    extras = commands.add_parser("extras", help="upscale existing images (A1111's Extras) and print the paths")
    extras.add_argument("--image", type=Path, action="append", required=True, help="input image (repeatable)")
    extras.add_argument("--upscaler", default="Lanczos", help="Lanczos, Nearest, R-ESRGAN 4x+, ... (default Lanczos)")
    extras.add_argument("--scale", type=float, default=2.0, help="scale factor (default 2)")
    extras.add_argument("--resize-to", metavar="WxH", help="resize to this size instead of --scale")
    extras.add_argument("--no-crop", dest="crop", action="store_false", help="with --resize-to: stretch, no crop")
    extras.add_argument("--upscaler-2", default="None", help="a second upscaler blended over the first")
    extras.add_argument("--upscaler-2-visibility", type=float, default=0.0)
    extras.add_argument("--face-restorer", choices=("GFPGAN", "CodeFormer"),
                        help="restore faces with this model, blended by --face-visibility")
    extras.add_argument("--face-visibility", type=float, default=1.0, help="with --face-restorer, 0-1 (default 1)")
    extras.add_argument("--gfpgan-visibility", type=float, default=0.0, help="GFPGAN over the result, 0 (off) to 1")
    extras.add_argument("--codeformer-visibility", type=float, default=0.0,
                        help="CodeFormer over the result, 0 (off) to 1")
    extras.add_argument("--codeformer-weight", type=float, default=0.0, help="0 = strongest (default), 1 = weakest")
    extras.add_argument("--out", type=Path, help="output folder (default <outputs>/extras-images)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        data_dir=args.data_dir,
        ckpt_dir=args.ckpt_dir,
        vae_dir=args.vae_dir,
        lora_dir=args.lora_dir,
        controlnet_dir=args.controlnet_dir,
        clip_vision_dir=args.clip_vision_dir,
        text_encoder_dir=args.text_encoder_dir,
        text_encoders=tuple(args.text_encoder),
        embeddings_dir=args.embeddings_dir,
        outputs_dir=args.outdir,
        wildcards_dir=args.wildcards_dir,
        device=args.device,
        precision=args.precision,
        no_half=args.no_half,
        no_half_vae=args.no_half_vae,
        medvram=args.medvram,
        lowvram=args.lowvram,
        threads=args.threads,
        torch_compile=args.torch_compile,
        channels_last=args.channels_last,
        checkpoint_cache_size=args.checkpoint_cache,
        default_checkpoint=args.ckpt,
        allow_downloads=not args.no_download,
        workers=args.workers,
        ray_address=args.ray_address,
    )


_REQUEST_ARGS = (
    "prompt", "negative_prompt", "checkpoint", "vae", "steps", "sampler", "schedule_type", "cfg_scale",
    "distilled_cfg_scale", "shift", "seed",
    "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "width", "height", "batch_size",
    "batch_count", "clip_skip", "randn_source", "eta_noise_seed_delta", "eta", "pad_cond_uncond", "denoising_strength",
    "resize_mode", "mask_blur", "masked_content",
    "inpaint_area", "only_masked_padding", "invert_mask", "save_images", "upscaler", "upscale_by", "enable_hr",
    "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps", "hr_sampler", "hr_prompt",
    "hr_negative_prompt", "restore_faces", "face_restorer", "face_visibility", "codeformer_weight",
    "save_before_face_restoration",
)


def run_extras(args: argparse.Namespace, settings: Settings) -> int:
    from PIL import Image

    from backend.errors import InputError
    from backend.postprocess import ExtrasRequest, run_extras
    from backend.runtime import Runtime

    images = []
    for path in args.image:
        try:
            image = Image.open(path)
            image.load()
        except OSError as exc:
            raise InputError(f"cannot read --image {path}: {exc}") from exc
        images.append(image)
    resize_to = None
    if args.resize_to:
        try:
            width, height = (int(v) for v in args.resize_to.lower().split("x"))
        except ValueError:
            raise InputError(f"--resize-to takes WIDTHxHEIGHT, such as 1024x768, not {args.resize_to}") from None
        resize_to = (width, height)
    if args.face_restorer == "GFPGAN":
        args.gfpgan_visibility = args.face_visibility
    elif args.face_restorer == "CodeFormer":
        args.codeformer_visibility = args.face_visibility
    request = ExtrasRequest(upscaler=args.upscaler, scale=args.scale, resize_to=resize_to, crop=args.crop,
                            upscaler_2=args.upscaler_2, upscaler_2_visibility=args.upscaler_2_visibility,
                            gfpgan_visibility=args.gfpgan_visibility, codeformer_visibility=args.codeformer_visibility,
                            codeformer_weight=args.codeformer_weight, output_dir=args.out)
    manager = Runtime.create(settings).manager  # the upscaler tile and face model options apply
    for result in run_extras(manager.upscalers, images, request, settings.output_root, faces=manager.faces):
        for note in result.notes:
            print(note, file=sys.stderr)
        print(result.path)
    return 0


def run_generate(args: argparse.Namespace, settings: Settings) -> int:
    from PIL import Image

    from backend.control_units import unit_from_spec
    from backend.errors import InputError
    from backend.request import GenerationRequest
    from backend.runtime import Runtime

    runtime = Runtime.create(settings)
    mode = "img2img" if args.init_image is not None else "txt2img"
    # The options' defaults (config.json, as the UI has them), then the flags the user gave.
    fields = runtime.request_defaults(mode, controls=True)
    fields.update({name: getattr(args, name) for name in _REQUEST_ARGS if getattr(args, name) is not None})
    for name in ("init_image", "mask"):
        path = getattr(args, name)
        if path is not None:
            try:
                fields[name] = Image.open(path)
                fields[name].load()
            except OSError as exc:
                raise InputError(f"cannot read --{name.replace('_', '-')} {path}: {exc}") from exc
    fields["control_units"] = tuple(unit_from_spec(spec, _open_image) for spec in args.controlnet)
    request = GenerationRequest(**fields)
    try:
        result = runtime.generate(request)
    finally:
        runtime.shutdown()
    for line in result.notes + [f"warning: {w}" for w in result.warnings]:
        print(line, file=sys.stderr)
    for path in result.paths:
        print(path)
    return 1 if result.interrupted else 0


def _open_image(path):
    from PIL import Image

    from backend.errors import InputError

    try:
        image = Image.open(path)
        image.load()
        return image
    except OSError as exc:
        raise InputError(f"cannot read the image {path}: {exc}") from exc


def run_detect(args: argparse.Namespace, settings: Settings) -> int:
    from backend import annotators
    from backend.control_preprocessors import run_preprocessor

    detected = run_preprocessor(args.module, _open_image(args.image), args.res, args.threshold_a, args.threshold_b,
                                weights=annotators.weights_for(args.module, settings))
    out = args.out or args.image.with_name(f"{args.image.stem}-{args.module}.png")
    detected.save(out)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    from backend import devices

    devices.set_threads(settings.threads)
    if args.command == "generate":
        return _run_reporting_errors(run_generate, args, settings)
    if args.command == "extras":
        return _run_reporting_errors(run_extras, args, settings)
    if args.command == "detect":
        return _run_reporting_errors(run_detect, args, settings)
    return run_webui(args, settings)


def run_webui(args: argparse.Namespace, settings: Settings) -> int:
    from ui.launch import LaunchError, launch

    server = server_options(args)
    from backend.errors import EaselError

    try:
        launch(settings, server)
    except (LaunchError, EaselError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def server_options(args: argparse.Namespace):
    from ui.launch import ServerOptions

    return ServerOptions(listen=args.listen, port=args.port, share=args.share, auth=args.gradio_auth,
                         auth_path=args.gradio_auth_path, insecure=args.insecure, api=args.api or args.nowebui,
                         nowebui=args.nowebui, api_auth=args.api_auth, api_admin=args.api_admin,
                         enable_insecure_extension_access=args.enable_insecure_extension_access,
                         flags={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                if k not in ("gradio_auth", "api_auth")})


def _run_reporting_errors(command, args, settings) -> int:
    """Expected failures (bad input, missing or broken models) end in one clear line, not a traceback."""
    from backend.errors import EaselError

    try:
        return command(args, settings)
    except EaselError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
