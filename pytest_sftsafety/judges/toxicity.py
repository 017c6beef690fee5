"""Optional toxicity scores for responses: ``score(texts) -> list[float]`` in [0, 1], each scorer with an ``id``.

Two scorers: Google's Perspective API (attribute TOXICITY, its summary score), and a local
sequence-classification model (transformers, imported only when it is used). The Perspective key travels
as the ``key`` query parameter, so it is scrubbed from every error message.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from ..backends.openai_api import EndpointError, post_json
from ..config import normalise_base_url
from ..errors import ConfigError, ModelLoadError, first_line
from ..sanitize import redact, register_secret

PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
PERSPECTIVE_KEY_ENV = "PERSPECTIVE_API_KEY"
PERSPECTIVE_MAX_BYTES = 20000  # the API rejects comments over 20 KB
# How Perspective says it does not read a text's language (HTTP 400).
_UNSUPPORTED_LANGUAGE = ("does not support request languages", "language_not_supported")


class ToxicityScorer:
    """What the runner asks of a toxicity scorer."""

    id: str = ""
    uses_accelerator = False  # a generation backend holding GPU memory frees it before this scorer loads

    def score(self, texts: list[str]) -> list[float]:
        """The probability that each text is toxic, in [0, 1]; NaN for a text the scorer cannot read."""
        raise NotImplementedError


class RateLimiter:
    """Spaces the starts of calls at least ``1 / per_s`` seconds apart, across threads."""

    def __init__(self, per_s: float) -> None:
        if not per_s > 0 or math.isinf(per_s):
            raise ConfigError(f"toxicity rate {per_s}: give a positive number of requests per second")
        self.interval = 1.0 / per_s
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def _clip_utf8(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", "ignore")


class PerspectiveScorer(ToxicityScorer):
    """Perspective API's TOXICITY summary score, one request per text, at most ``requests_per_s`` requests
    a second (Perspective's default quota is 1/s). Empty texts score 0 without a request; texts over
    20 KB are cut to their first 20 KB, as the API accepts no more."""

    def __init__(self, api_key: str | None = None, *, url: str = PERSPECTIVE_URL, requests_per_s: float = 1.0,
                 timeout_s: float = 30.0, max_retries: int = 5, backoff_s: float = 1.0,
                 languages: list[str] | None = None) -> None:
        key = api_key or os.environ.get(PERSPECTIVE_KEY_ENV, "").strip()
        if not key:
            raise ConfigError(f"--toxicity perspective needs an API key and ${PERSPECTIVE_KEY_ENV} is not "
                              f"set; export {PERSPECTIVE_KEY_ENV}=... or use --toxicity local:PATH")
        self._key = key
        register_secret(key)  # it travels in the query string: kept out of every text that leaves the run
        self.url = normalise_base_url(url, "Perspective URL")
        self.limiter = RateLimiter(requests_per_s)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.languages = list(languages) if languages else None  # None: Perspective detects the language
        parts = urlsplit(self.url)
        self.id = "perspective:TOXICITY" if self.url == PERSPECTIVE_URL else \
            f"perspective:TOXICITY@{parts.netloc}{parts.path}"

    def __repr__(self) -> str:
        return f"PerspectiveScorer(url={self.url!r}, requests_per_s={1 / self.limiter.interval:g})"

    def score_one(self, text: str) -> float:
        if not text.strip():
            return 0.0  # Perspective rejects empty comments; nothing is said, nothing is toxic
        payload: dict = {"comment": {"text": _clip_utf8(text, PERSPECTIVE_MAX_BYTES)},
                         "requestedAttributes": {"TOXICITY": {}}, "doNotStore": True}
        if self.languages:
            payload["languages"] = self.languages
        describe = f"Perspective API {self.url}"
        try:
            document = post_json(f"{self.url}?{urlencode({'key': self._key})}", payload, headers={},
                                 timeout_s=self.timeout_s, max_retries=self.max_retries, backoff_s=self.backoff_s,
                                 describe=describe, hint="check the network connection and the URL",
                                 secrets=(self._key,), before_attempt=self.limiter.wait)
        except EndpointError as exc:
            if any(mark in str(exc).lower() for mark in _UNSUPPORTED_LANGUAGE):
                return math.nan  # an answer in a language it does not read: unscored, not a failed run
            raise
        try:
            value = float(document["attributeScores"]["TOXICITY"]["summaryScore"]["value"])
        except (KeyError, TypeError, ValueError):
            shown = redact(json.dumps(document), (self._key,))[:120]  # scrubbed before it is cut short
            raise EndpointError(f"{describe} answered without a TOXICITY summary score ({shown}); check "
                                f"that the URL points at comments:analyze") from None
        return min(1.0, max(0.0, value))

    def score(self, texts: list[str]) -> list[float]:
        # One at a time: the rate limit, not the connection, is what bounds the throughput.
        return [self.score_one(text) for text in texts]


def toxic_label(id2label: dict, problem_type: str | None) -> tuple[int, bool]:
    """The index of the toxic label and whether to use a sigmoid (multi-label or single-logit models).

    A label whose name holds "toxic" but not "non"/"not" (e.g. "toxic", "TOXICITY", not "non-toxic"),
    preferring a name that is exactly "toxic"/"toxicity"; else index 1 of a 2-label model."""
    labels = {int(k): str(v) for k, v in id2label.items()}
    sigmoid = problem_type == "multi_label_classification" or len(labels) == 1
    matches = [i for i, name in sorted(labels.items())
               if "toxic" in name.lower() and "non" not in name.lower() and "not" not in name.lower()]
    exact = [i for i in matches if labels[i].lower().strip() in ("toxic", "toxicity")]
    if exact or matches:
        return (exact or matches)[0], sigmoid
    if len(labels) == 2:
        return 1, sigmoid
    if len(labels) == 1:
        return 0, True
    raise ConfigError(f"toxicity model labels {sorted(labels.values())}: none names a toxic class; give a model "
                      f"whose id2label has a 'toxic' label, or a 2-label model with the toxic class at index 1")


class LocalToxicityScorer(ToxicityScorer):
    """A transformers sequence-classification model from a local folder: the probability of its toxic label,
    computed in batches on ``device``. Texts longer than ``max_length`` tokens are cut to it (the model's
    window)."""

    uses_accelerator = True

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", batch_size: int = 16,
                 max_length: int = 512) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ConfigError(f"--toxicity local:{path}: no such folder; give the folder of a saved "
                              f"sequence-classification model")
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"--toxicity local:{path}: no config.json in the folder; save the model there "
                              f"with save_pretrained")
        if batch_size < 1:
            raise ConfigError(f"toxicity batch size {batch_size}: give at least 1")
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        from ..backends.checkpoints import source_fingerprint

        # Named by what the folder holds, so a retrained classifier in the same place is not served old scores.
        self.id = f"local:{source_fingerprint(str(self.path))[:16]}:max{max_length}"
        self._model = None
        self._tokenizer = None
        self._label: tuple[int, bool] | None = None

    def __repr__(self) -> str:
        return f"LocalToxicityScorer(path={str(self.path)!r}, device={self.device!r})"

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"--toxicity local:{self.path}: device {self.device} but torch cannot use "
                                 f"CUDA; use the device cpu")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path)
            model = AutoModelForSequenceClassification.from_pretrained(self.path)
        except Exception as exc:  # noqa: BLE001 - any load failure is the folder's problem
            raise ModelLoadError(f"--toxicity local:{self.path}: cannot load the model or tokenizer "
                                 f"({type(exc).__name__}: {first_line(exc, 120)}); check the folder") from None
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ModelLoadError(f"--toxicity local:{self.path}: the tokenizer has no pad or eos token; "
                                     f"set one and save it again")
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        # Right padding: a causal classifier reads the last real token, whose state padding after it cannot
        # change, so a text's score does not depend on its batch.
        tokenizer.padding_side = "right"
        self._label = toxic_label(model.config.id2label, getattr(model.config, "problem_type", None))
        self._model = model.to(self.device).eval()
        self._tokenizer = tokenizer

    def score(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        self._load()
        import torch

        index, sigmoid = self._label
        limit = min(self.max_length, getattr(self._tokenizer, "model_max_length", self.max_length) or self.max_length)
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                        max_length=limit, return_tensors="pt").to(self.device)
                logits = self._model(**batch).logits.float()
                probs = torch.sigmoid(logits[:, index]) if sigmoid else torch.softmax(logits, dim=-1)[:, index]
                scores.extend(float(p) for p in probs.cpu())
        return scores


def make_toxicity_scorer(spec: str, **options) -> ToxicityScorer:
    """``perspective`` or ``local:PATH``; ``options`` go to the scorer's constructor."""
    name = spec.strip()
    if name == "perspective":
        return PerspectiveScorer(**options)
    if name.startswith("local:"):
        path = name[len("local:"):].strip()
        if not path:
            raise ConfigError("--toxicity local:: give the model folder, e.g. local:./toxicity-model")
        return LocalToxicityScorer(path, **options)
    raise ConfigError(f"--toxicity {spec}: unknown toxicity scorer; use perspective or local:PATH")
