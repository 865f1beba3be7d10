"""Face restoration: GFPGAN and CodeFormer, on every face found in an image.

Each face is found by a detector, aligned to the 512x512 FFHQ template by a similarity transform of
its landmarks (A1111 and facexlib do the same), restored by the model, and pasted back through the
inverse transform under a soft-edged mask; the result is blended with the original by a visibility.

Detectors, best first:
- RetinaFace through facexlib, when that package is installed and its weights
  (`detection_Resnet50_Final.pth`) are in `models/GFPGAN`, as A1111 keeps them: five landmarks.
- OpenCV's Haar cascades, which ship inside the opencv 4.x wheel and so always work offline: the
  face box, and the eyes found inside it (or placed by the box's proportions when the eye cascade
  misses them).
The result names the detector that ran.

Weights: `GFPGANv1.4.pth` (or v1.3, or any GFPGAN file) in `models/GFPGAN`, CodeFormer in
`models/Codeformer`, loaded through spandrel (CodeFormer's architecture through
spandrel_extra_arches); downloaded from A1111's URLs on first use when allowed.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend import downloads
from backend.errors import InputError
from backend.model_index import scan

logger = logging.getLogger(__name__)

FACE_SIZE = 512
# Where the five landmarks (eyes as seen in the image left then right, nose tip, mouth corners) of
# an FFHQ-aligned face lie in a 512x512 crop.
FFHQ_LANDMARKS = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                           [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
# Where a Haar frontal-face box puts the eyes, as fractions of its width and height.
HAAR_EYES = np.array([[0.30, 0.38], [0.70, 0.38]], dtype=np.float32)
CROP_BORDER = (135, 133, 132)  # fills the crop outside the image (facexlib's value)
RESTORERS = ("CodeFormer", "GFPGAN")  # A1111's names, in its order
SUFFIXES = (".pth", ".pt", ".safetensors")


class FaceRestorationError(InputError):
    pass


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, width, height
    landmarks: np.ndarray  # (5, 2) in FFHQ_LANDMARKS order, or (2, 2): the eyes


@dataclass
class Restoration:
    image: Image.Image
    faces: int
    detector: str

    def found(self) -> str:
        """For the status line: "1 face found by OpenCV Haar cascades"."""
        return f"{self.faces} face{'s' * (self.faces != 1)} found by {self.detector}"


# -- detection --------------------------------------------------------------------------------------
class HaarDetector:
    name = "OpenCV Haar cascades"

    def __init__(self):
        import cv2

        folder = Path(cv2.data.haarcascades)
        self.faces = cv2.CascadeClassifier(str(folder / "haarcascade_frontalface_default.xml"))
        self.eyes = cv2.CascadeClassifier(str(folder / "haarcascade_eye.xml"))
        if self.faces.empty() or self.eyes.empty():
            raise FaceRestorationError("OpenCV's Haar cascades are missing: install opencv-python-headless < 5 "
                                       "(opencv 5 wheels ship no cascades)")

    def detect(self, rgb: np.ndarray) -> list[Face]:
        import cv2

        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        smallest = max(24, min(gray.shape) // 20)
        boxes = self.faces.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
        faces = [Face(tuple(int(v) for v in box), self._eyes(gray, box)) for box in boxes]
        return sorted(faces, key=lambda f: -f.box[2] * f.box[3])

    def _eyes(self, gray: np.ndarray, box) -> np.ndarray:
        """The two eye centres: found by the eye cascade in the upper part of the face (one in each
        half), else where a frontal face box puts them."""
        x, y, w, h = (int(v) for v in box)
        upper = gray[y : y + int(h * 0.6), x : x + w]
        found = self.eyes.detectMultiScale(upper, scaleFactor=1.1, minNeighbors=5, minSize=(w // 10, w // 10),
                                           maxSize=(w // 2, w // 2))
        left = [e for e in found if e[0] + e[2] / 2 < w / 2]
        right = [e for e in found if e[0] + e[2] / 2 >= w / 2]
        if left and right:
            eyes = [max(side, key=lambda e: e[2]) for side in (left, right)]
            return np.array([[x + ex + ew / 2, y + ey + eh / 2] for ex, ey, ew, eh in eyes], dtype=np.float32)
        return np.array([x, y], dtype=np.float32) + HAAR_EYES * np.array([w, h], dtype=np.float32)


class RetinaFaceDetector:
    """facexlib's RetinaFace (A1111's detector), from weights already in `models/GFPGAN`."""

    name = "RetinaFace"
    WEIGHTS = "detection_Resnet50_Final.pth"

    @classmethod
    def available(cls, folder: Path) -> bool:
        return importlib.util.find_spec("facexlib") is not None and (Path(folder) / cls.WEIGHTS).exists()

    def __init__(self, folder: Path, device: torch.device):
        from facexlib.detection import init_detection_model

        # With the file already in model_rootpath, facexlib loads it and downloads nothing.
        self.net = init_detection_model("retinaface_resnet50", half=False, device=str(device),
                                        model_rootpath=str(folder))

    def detect(self, rgb: np.ndarray) -> list[Face]:
        with torch.no_grad():
            found = self.net.detect_faces(np.ascontiguousarray(rgb[:, :, ::-1]), 0.97)  # facexlib reads BGR
        faces = []
        for row in found:
            if not np.isfinite(row[:15]).all():
                continue
            x1, y1, x2, y2 = (int(round(v)) for v in row[:4])
            if x2 <= max(0, x1) or y2 <= max(0, y1) or x1 >= rgb.shape[1] or y1 >= rgb.shape[0]:
                continue  # empty, or outside the image
            faces.append(Face((x1, y1, x2 - x1, y2 - y1), np.asarray(row[5:15], dtype=np.float32).reshape(5, 2)))
        return sorted(faces, key=lambda f: -f.box[2] * f.box[3])


# -- alignment and paste-back ---------------------------------------------------------------------
def alignment(landmarks: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform taking the face's landmarks to the FFHQ template."""
    import cv2

    template = FFHQ_LANDMARKS[: len(landmarks)]
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template, method=cv2.LMEDS)
    if matrix is None:
        raise FaceRestorationError("could not align a face (degenerate landmarks)")
    return matrix


def crop_face(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.warpAffine(rgb, matrix, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=CROP_BORDER)


def paste_face(canvas: np.ndarray, face: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """`face` (512x512, aligned by `matrix`) put back into `canvas` (float32 HxWx3) under a mask
    eroded and blurred in proportion to the face's size; pixels the mask does not reach keep their
    exact values."""
    import cv2

    height, width = canvas.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    back = cv2.warpAffine(face.astype(np.float32), inverse, (width, height), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, (width, height),
                          flags=cv2.INTER_NEAREST)
    edge = max(1, int(np.sqrt(mask.sum())) // 20)
    mask = cv2.erode(mask, np.ones((2 * edge + 1, 2 * edge + 1), np.uint8))
    mask = cv2.GaussianBlur(mask, (4 * edge + 1, 4 * edge + 1), 0)[:, :, None]
    return np.where(mask > 0, mask * back + (1 - mask) * canvas, canvas)


# -- models ---------------------------------------------------------------------------------------
def load_restorer(path: Path, device: torch.device):
    """A spandrel descriptor for a GFPGAN or CodeFormer file; FaceRestorationError names the problem."""
    import spandrel
    import spandrel_extra_arches

    spandrel_extra_arches.install(ignore_duplicates=True)  # CodeFormer lives there
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise FaceRestorationError(f"{path.name}: not a GFPGAN or CodeFormer model") from None
    except Exception as error:  # truncated or foreign file
        raise FaceRestorationError(f"cannot read {path.name} ({error}); the file is damaged or not a model: "
                                   "download it again") from None
    if descriptor.architecture.id not in ("GFPGAN", "CodeFormer"):
        raise FaceRestorationError(f"{path.name} is a {descriptor.architecture.name} model, not GFPGAN or CodeFormer")
    return descriptor.eval()


class FaceRestorers:
    """GFPGAN and CodeFormer over the faces of an image. Loaded models stay loaded (one file per
    restorer, never loaded twice) unless `release_after_use` frees them after each image."""

    def __init__(self, gfpgan_dir: Path, codeformer_dir: Path, device: torch.device | None = None,
                 allow_download: bool = False, release_after_use: bool = False):
        self.folders = {"GFPGAN": Path(gfpgan_dir), "CodeFormer": Path(codeformer_dir)}
        self.device = device or torch.device("cpu")
        self.allow_download = allow_download
        self.release_after_use = release_after_use
        self._loaded: dict[str, tuple[Path, object]] = {}  # restorer name -> (file, descriptor)
        self._detector = None
        self._lock = threading.Lock()
        self.loads = 0

    def find(self, name: str) -> str:
        for known in RESTORERS:
            if name.lower() == known.lower():
                return known
        raise FaceRestorationError(f"unknown face restorer '{name}'; available: {', '.join(RESTORERS)}")

    def weights(self, name: str) -> Path:
        """The restorer's weight file: the standard one, else any file of that kind in its folder, else
        downloaded (when allowed)."""
        name = self.find(name)
        folder = self.folders[name]
        standard = ("GFPGANv1.4.pth", "GFPGANv1.3.pth") if name == "GFPGAN" else ("codeformer-v0.1.0.pth",)
        for filename in standard:
            if (folder / filename).exists():
                return folder / filename
        files = sorted((f.path for f in scan(folder, SUFFIXES) if name.lower() in f.path.name.lower()),
                       key=lambda p: p.name.lower(), reverse=True)  # GFPGANv1.4 before v1.3
        if files:
            return files[0]
        try:
            return downloads.ensure(standard[0], folder, self.allow_download)
        except downloads.DownloadError as error:
            raise FaceRestorationError(f"{name} weights not found: {error}") from None

    def model(self, name: str):
        path = self.weights(name)
        loaded = self._loaded.get(name)
        if loaded is None or loaded[0] != path:
            self._loaded.pop(name, None)  # free a replaced file before loading its successor
            loaded = self._loaded[name] = (path, load_restorer(path, self.device))
            self.loads += 1
        return loaded[1]

    def detector(self):
        if self._detector is None:
            folder = self.folders["GFPGAN"]
            if RetinaFaceDetector.available(folder):
                try:
                    self._detector = RetinaFaceDetector(folder, self.device)
                except Exception as error:  # a broken optional install must not stop restoration
                    logger.warning("RetinaFace unavailable (%s); using OpenCV's Haar cascades", error)
            if self._detector is None:
                self._detector = HaarDetector()
        return self._detector

    def release(self) -> None:
        with self._lock:
            self._loaded.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def restore(self, image: Image.Image, name: str, visibility: float = 1.0, codeformer_weight: float = 0.5,
                should_stop: Callable[[], bool] = lambda: False) -> Restoration:
        """Every detected face restored; the whole image blended with the original by `visibility`.
        CodeFormer's weight: 0 restores the most, 1 keeps the most of the input (A1111's meaning)."""
        if not 0 <= visibility <= 1:
            raise FaceRestorationError(f"face restoration visibility must be between 0 and 1, not {visibility}")
        if not 0 <= codeformer_weight <= 1:
            raise FaceRestorationError(f"CodeFormer weight must be between 0 and 1, not {codeformer_weight}")
        name = self.find(name)
        source = image.convert("RGB")
        rgb = np.asarray(source)
        with self._lock:
            detector = self.detector()
            faces = detector.detect(rgb)
            if not faces or visibility == 0:
                return Restoration(source, len(faces), detector.name)
            descriptor = self.model(name)
            canvas = rgb.astype(np.float32)
            for face in faces:
                if should_stop():
                    break
                matrix = alignment(face.landmarks)
                restored = self._run(descriptor, crop_face(rgb, matrix), codeformer_weight)
                canvas = paste_face(canvas, restored, matrix)
        if self.release_after_use:
            self.release()
        result = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
        if visibility < 1:
            result = Image.blend(source, result, visibility)
        return Restoration(result, len(faces), detector.name)

    @torch.no_grad()
    def _run(self, descriptor, crop: np.ndarray, codeformer_weight: float) -> np.ndarray:
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(self.device)
        if descriptor.architecture.id == "CodeFormer":
            out = descriptor.model(x, weight=codeformer_weight, adain=True)[0]
        else:
            # The decoder's fixed noise buffers rather than fresh noise: the same input gives the same face.
            out = descriptor.model(x, return_rgb=False, randomize_noise=False)[0]
        out = out.float().clamp(-1, 1).add(1).mul(127.5)
        return out[0].permute(1, 2, 0).cpu().numpy()
