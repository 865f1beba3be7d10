"""`generate`: one `GenerationRequest` -> images, for txt2img, img2img and inpainting.

Reads as numbered steps (check, activate, seeds, encode, per batch: noise, denoise, decode, save).
Each image has its own noise generator and its own scheduler, so image i of a batch is the same
image as a single generation with seed+i, whatever the sampler.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from dataclasses import dataclass

from backend import (
    conditioning,
    control_pass,
    control_preprocessors,
    control_units,
    denoiser,
    hires,
    image_record,
    init_image,
    memory_fallback,
    model_fit,
    noise,
    outputs,
    samplers,
    vae_codec,
)
from backend.extensions import NO_EXTENSIONS, AfterImage, BeforeGeneration, ExtensionRegistry, ScriptRun
from backend.extra_networks import NetworkSession
from backend.model_manager import ModelManager
from backend.progress import JobControl
from backend.request import GeneratedImage, GenerationRequest, GenerationResult, RequestError
from backend.styles import StyleDatabase
from backend.upscalers import Interrupted
from backend.wildcards import Wildcards

logger = logging.getLogger(__name__)


def generate(
    manager: ModelManager,
    request: GenerationRequest,
    control: JobControl | None = None,
    rng: random.Random | None = None,
    now: dt.datetime | None = None,
    extensions: ExtensionRegistry = NO_EXTENSIONS,
) -> GenerationResult:
    control = control or JobControl()
    if request.script_name and request.script_name != "None":
        return _run_script(manager, request, control, rng, now, extensions)
    early_warnings: list[str] = []
    # 1. Extensions may change the request; then check it, and every name in it, before any weights move
    request = _before_generation(extensions, request, early_warnings)
    plan = _check_inputs(manager, request)
    with manager.lock:
        # 2. Activate the checkpoint (a no-op when it is already active); it sets the default size
        model = manager.activate(request.checkpoint, request.vae)
        plan = model_fit.fit_plan(model, plan, request)
        width, height = model_fit.check_sizes(model, request, plan.hires)
        # 3. Resolve seeds (-1 means random, and the seed used is reported), then apply styles
        result = _start_result(manager, request, width, height, rng, early_warnings)
        run = result.request
        # 4. Prepare wildcards (per image, seeded by its seed), networks, the init image and the saver
        job = _Job(manager, model, plan, result, control, extensions, now)
        try:
            for batch in range(run.batch_count):
                if control.interrupted:
                    break
                control.take_skip()
                # 5. Denoise, with the LoRAs of the batch's first prompt applied
                latents, texts = job.first_pass(batch)
                if latents is None:  # skipped or interrupted
                    continue
                lora_hashes = job.networks.lora_hashes()  # the first pass's: a hires prompt may apply others
                # 6. Hires fix: upscale the latents, then a second pass at the large size
                if plan.hires is not None:
                    latents = job.hires_pass(batch, texts, latents)
                    if latents is None:  # skipped
                        continue
                # 7. Decode, restore the untouched parts of an inpainted image, postprocess, save
                for index, image in enumerate(vae_codec.decode(model, latents, result.warnings)):
                    result.images.append(job.finish_image(batch, index, image, texts[index], lora_hashes))
        except memory_fallback.OutOfMemoryError as error:
            if not result.images:
                raise
            result.warnings.append(f"{error}; the {len(result.images)} images finished before are kept")
        finally:
            job.networks.close()  # the base weights, bit for bit
        result.interrupted = control.interrupted
        if not result.images:  # say why, or the user sees an empty result and no reason
            result.warnings.append(control.no_image_warning())
        return result


@dataclass
class _Plan:
    """What the request asks for beyond the denoising, checked before any weights move."""

    sampler: samplers.Sampler
    schedule: str
    upscaler: str | None
    face_restorer: str | None
    hires: _HiresPlan | None


def _check_inputs(manager: ModelManager, request: GenerationRequest) -> _Plan:
    """Validate the request and resolve its names, so that an unknown sampler, upscaler or face
    restorer (or missing face restorer weights) fails before any denoising."""
    request.validate()
    sampler, schedule = samplers.resolve(request.sampler, request.schedule_type)
    upscaler = face_restorer = None
    if request.upscaler and request.upscaler != "None":
        upscaler = manager.upscalers.find(request.upscaler).name
    if request.restore_faces:
        face_restorer = manager.faces.find(request.face_restorer)
        manager.faces.weights(face_restorer)  # found, or fetched, now
    return _Plan(sampler, schedule, upscaler, face_restorer, _HiresPlan.check(manager, request, sampler))


def _start_result(manager: ModelManager, request: GenerationRequest, width: int, height: int,
                  rng: random.Random | None, warnings: list[str]) -> GenerationResult:
    """The result to fill, its request the one to run: seeds resolved, sizes filled in, styles applied."""
    seed = noise.resolve_seed(request.seed, rng)
    subseed = noise.resolve_seed(request.subseed, rng) if request.subseed_strength > 0 else -1
    run = request.with_changes(seed=seed, subseed=subseed, width=width, height=height)
    result = GenerationResult(request=run, warnings=warnings)
    if run.styles:  # styles first: their text may hold wildcards too
        result.request = _apply_styles(run, StyleDatabase(manager.settings.styles_file), result.warnings)
    return result


class _Job:
    """What the batches of one generation share, and the steps each batch runs."""

    def __init__(self, manager: ModelManager, model, plan: _Plan, result: GenerationResult, control: JobControl,
                 extensions: ExtensionRegistry, now: dt.datetime | None):
        run = result.request
        self.manager, self.model, self.plan, self.run, self.result = manager, model, plan, run, result
        self.control, self.extensions, self.now = control, extensions, now
        # LoRA tags and embeddings come from the expanded prompts; their warnings go to the result
        self.networks = NetworkSession(model, manager.loras, manager.embeddings, result.warnings)
        self.prompts = _PromptTexts(model, run, Wildcards(manager.settings.wildcards_folder), self.networks)
        self.source = init_image.prepare(run, run.width, run.height) if run.init_image is not None else None
        self.saver = outputs.ImageSaver(run.output_dir or manager.settings.output_root / f"{run.mode}-images",
                                        result.warnings)
        self.padded: set[int] = set()  # batches whose conds were padded to the unconds' length (A1111's "Pad conds")
        self.controls: dict[bool, list] = {}  # ControlNet units ready for the first pass (False) and the hires pass
        self.control_titles: dict[str, str] = {}

    def controls_for(self, size: tuple[int, int], hires_pass: bool = False) -> list:
        """The ControlNet units of this pass, prepared once for all batches."""
        if hires_pass not in self.controls:
            init, units = None, self.run.control_units
            if self.source is not None:
                init, units = self.run.init_image, tuple(self.source.control_unit(u) for u in units)
            self.controls[hires_pass], titles = control_pass.prepare(
                units, self.manager.controlnets, self.model, size, init, hires_pass,
                control_preprocessors.numpy_seed(self.run.seed, self.run.subseed), self.result.warnings)
            self.control_titles.update(titles)
        return self.controls[hires_pass]

    def _positions(self, batch: int) -> range:
        return range(batch * self.run.batch_size, (batch + 1) * self.run.batch_size)

    def first_pass(self, batch: int):
        """The batch's latents (None when skipped or interrupted) and each image's (prompt, negative)."""
        run, plan = self.run, self.plan
        positions = self._positions(batch)
        seeds = [_seeds(run, p) for p in positions]
        texts = [self.prompts.texts(p) for p in positions]
        conds = self.prompts.conditioning_for_batch(texts)
        if run.pad_cond_uncond and any(c.lengths_differ(run.steps - 1) for c in conds):
            self.padded.add(batch)
        share = (0.0, hires.first_pass_share(run) if plan.hires is not None else 1.0)
        inputs = denoiser.BatchInputs(run, plan.sampler, plan.schedule, conds, self.source, seeds, share=share,
                                      extensions=self.extensions, warnings=self.result.warnings,
                                      controls=self.controls_for((run.width, run.height)))
        latents = memory_fallback.retry_in_less_memory(
            lambda: denoiser.denoise(self.model, inputs, self.control, batch), self.model, self.result.warnings,
            "sampling")
        return latents, texts

    def hires_pass(self, batch: int, texts: list[tuple[str, str]], latents):
        """The large latents; when interrupted, the first pass's (with a warning); None when skipped."""
        run, plan, prompts = self.run, self.plan, self.prompts
        positions = self._positions(batch)
        # A1111's timelines: a whole `when` counts on from the first pass's steps, a fraction runs 1..2
        conds = prompts.conditioning_for_batch(
            [prompts.hires_texts(p, t) for p, t in zip(positions, texts)], hires_steps=hires.second_pass_steps(run))
        large = memory_fallback.retry_in_less_memory(
            lambda: hires.second_pass(self.model, run, plan.hires.sampler, plan.schedule, conds,
                                      [_seeds(run, p) for p in positions], latents, plan.hires.size,
                                      self.manager.upscalers, self.control, batch, self.extensions,
                                      self.result.warnings, self.controls_for(plan.hires.size, hires_pass=True)),
            self.model, self.result.warnings, "the hires pass")
        if large is not None or not self.control.interrupted:
            return large
        self.result.warnings.append("interrupted during the hires pass: the image is kept at "
                                    f"the first pass's size, {run.width}x{run.height}")
        return latents

    def finish_image(self, batch: int, index: int, image, texts: tuple[str, str], lora_hashes) -> GeneratedImage:
        """One decoded image: inpainting's untouched parts restored, faces restored, upscaled, passed
        to extensions' `after_image`, then its infotext written and the image saved."""
        run, plan, result, networks = self.run, self.plan, self.result, self.networks
        image = control_pass.restore_inpaint(image, self.controls.get(plan.hires is not None, []))
        if self.source is not None:
            image = self.source.restore(image)
        extra = {**(plan.hires.infotext(run, plan.sampler) if plan.hires is not None else {}),
                 "Lora hashes": lora_hashes,
                 "TI hashes": networks.ti_hashes(*networks.strip(texts)[0]),
                 "Pad conds": True if batch in self.padded else None,
                 **control_units.infotext_parameters(run.control_units, self.control_titles)}
        before_faces = None
        if plan.face_restorer is not None:
            before_faces = image
            image = _restore_faces(self.manager, run, plan.face_restorer, image, self.control, extra, result)
        if plan.upscaler is not None:
            image = _upscale(self.manager, run, plan.upscaler, image, self.control, extra, result.warnings)
        if self.extensions.has("after_image"):
            image = _after_image(self.extensions, run, image, batch * run.batch_size + index, texts[0], extra,
                                 result.warnings)
        seed, subseed = _seeds(run, batch * run.batch_size + index)
        return image_record.finish_image(self.model, run, plan.sampler, plan.schedule, seed, subseed, image,
                                         self.saver, self.now, texts, extra,
                                         before_faces if run.save_before_face_restoration else None)


class _HiresPlan:
    """The hires fix of a txt2img request, checked before any denoising."""

    def __init__(self, upscaler: str, sampler: samplers.Sampler):
        self.upscaler, self.sampler = upscaler, sampler
        self.size: tuple[int, int] = (0, 0)

    @classmethod
    def check(cls, manager: ModelManager, request: GenerationRequest, sampler: samplers.Sampler) -> _HiresPlan | None:
        if not request.enable_hr or request.init_image is not None:  # img2img ignores it, as A1111 does
            return None
        upscaler = hires.check_upscaler(request.hr_upscaler, manager.upscalers)
        if request.hr_sampler and request.hr_sampler != hires.SAME_SAMPLER:
            sampler = samplers.resolve(request.hr_sampler, request.schedule_type)[0]
        return cls(upscaler, sampler)

    def infotext(self, run: GenerationRequest, first_sampler: samplers.Sampler) -> dict:
        return hires.infotext(run, self.upscaler, self.sampler.name, first_sampler.name)


def _run_script(manager: ModelManager, request: GenerationRequest, control: JobControl, rng, now,
                extensions: ExtensionRegistry) -> GenerationResult:
    """A script's job: it calls `generate` as often as it needs, with this job's control."""
    script = extensions.script(request.script_name)
    if script is None:
        names = ", ".join(s.title for s in extensions.scripts()) or "none installed"
        raise RequestError(f"script '{request.script_name}' not found; scripts: {names}")
    plain = request.with_changes(script_name=None)
    result = GenerationResult(request=plain)

    def run_one(changed: GenerationRequest) -> GenerationResult:
        one = generate(manager, changed.with_changes(script_name=None), control, rng, now, extensions)
        result.warnings.extend(w for w in one.warnings if w not in result.warnings)
        return one

    script.run(ScriptRun(plain, script.args(request.script_args), run_one, control, result))
    result.interrupted = control.interrupted
    return result


def _before_generation(extensions, request: GenerationRequest, warnings: list[str]) -> GenerationRequest:
    if not extensions.has("before_generation"):
        return request
    box = {"request": request}
    extensions.emit("before_generation",
                    lambda e: BeforeGeneration(box["request"], extensions.args(e, box["request"].script_args)),
                    warnings, lambda event: box.update(request=event.request))
    return box["request"]


def _after_image(extensions, run: GenerationRequest, image, position: int, prompt: str, extra: dict,
                 warnings: list[str]):
    seed = _seeds(run, position)[0]
    box = {"image": image}

    def make(extension):
        return AfterImage(box["image"], position, seed, prompt, run, {}, extensions.args(extension, run.script_args))

    def after(event: AfterImage) -> None:
        box["image"] = event.image
        extra.update(event.parameters)

    extensions.emit("after_image", make, warnings, after)
    return box["image"]


def _restore_faces(manager, run, name: str, image, control: JobControl, extra: dict, result: GenerationResult):
    restoration = manager.faces.restore(image, name, run.face_visibility, run.codeformer_weight,
                                        should_stop=lambda: control.interrupted)
    note = f"Face restoration ({name}): {restoration.found()}"
    if note not in result.notes:
        result.notes.append(note)
    extra["Face restoration"] = name
    return restoration.image


def _upscale(manager, run, upscaler: str, image, control: JobControl, extra: dict, warnings: list[str]):
    try:
        image = manager.upscalers.upscale(image, upscaler, scale=run.upscale_by,
                                          should_stop=lambda: control.interrupted)
    except Interrupted:
        warnings.append("interrupted while upscaling: the image is kept at its generated size")
        return image
    extra.update({"Postprocess upscaler": upscaler, "Postprocess upscale by": run.upscale_by})
    return image


def _apply_styles(run: GenerationRequest, styles: StyleDatabase, warnings: list[str]) -> GenerationRequest:
    unknown = [name for name in run.styles if name not in styles.styles]
    if unknown:
        warnings.append(f"style(s) {', '.join(unknown)} not found in {styles.path}; skipped")
    prompt, negative = styles.apply(list(run.styles), run.prompt, run.negative_prompt)
    return run.with_changes(prompt=prompt, negative_prompt=negative)


class _PromptTexts:
    """The prompt and negative prompt of each image position, wildcards expanded (seeded by the
    image's seed, or the first image's with `same_wildcards`), and their conditioning: extra network
    tags stripped, each distinct pair encoded once per set of applied LoRAs."""

    def __init__(self, model, run: GenerationRequest, wildcards: Wildcards, networks: NetworkSession):
        self.model, self.run, self.wildcards, self.networks = model, run, wildcards, networks
        self.warnings = networks.warnings
        self._encoded: dict[tuple, conditioning.Conditioning] = {}

    def texts(self, position: int) -> tuple[str, str]:
        seed = self._wildcard_seed(position)
        return self._expand(self.run.prompt, seed), self._expand(self.run.negative_prompt, seed)

    def hires_texts(self, position: int, texts: tuple[str, str]) -> tuple[str, str]:
        """The hires pass's prompts: its own (wildcards expanded with the image's seed) or the first pass's."""
        run, seed = self.run, self._wildcard_seed(position)
        own = [self._expand(text, seed) if text else None for text in (run.hr_prompt, run.hr_negative_prompt)]
        return own[0] or texts[0], own[1] or texts[1]

    def _wildcard_seed(self, position: int) -> int:
        return self.run.seed if self.run.same_wildcards else _seeds(self.run, position)[0]

    def _expand(self, text: str, seed: int) -> str:
        expansion = self.wildcards.expand(text, seed)
        self.warnings.extend(w for w in expansion.warnings if w not in self.warnings)
        return expansion.text

    def conditioning_for_batch(self, texts: list[tuple[str, str]], hires_steps: int | None = None
                               ) -> list[conditioning.Conditioning]:
        """Each image's conditioning for the first pass, or with `hires_steps` for the hires pass."""
        stripped = [self.networks.strip(pair) for pair in texts]
        applied = self.networks.activate(stripped[0][1])  # A1111: the batch's first prompt's LoRAs
        return [self._conditioning(*pair, applied, hires_steps) for pair, _ in stripped]

    def _conditioning(self, prompt: str, negative: str, applied: tuple, hires_steps: int | None
                      ) -> conditioning.Conditioning:
        key = (prompt, negative, applied, hires_steps)  # a text-encoder LoRA changes the encoding
        if key not in self._encoded:
            run = self.run
            self._encoded[key] = conditioning.encode_for_generation(
                self.model, prompt, negative, run.steps, run.clip_skip, run.emphasis, self.networks.embedding_set,
                hires_steps=hires_steps, use_old_scheduling=run.use_old_scheduling)
        return self._encoded[key]


def _seeds(run: GenerationRequest, position: int) -> tuple[int, int]:
    """Seed and variation seed of the image at `position`: the seed advances, or with a variation
    seed the variation seed advances instead (A1111)."""
    if run.subseed_strength > 0:
        return run.seed, run.subseed + position
    return run.seed + position, run.subseed
