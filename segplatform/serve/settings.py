"""Settings of the segmentation endpoint, with their defaults, and the Serve options they imply.

``ServeSettings`` is what ``segplatform serve``, ``deploy/serve.yaml`` (``args:``) and
``build_app`` take. The request-handling part travels to the replicas as the deployment's
``user_config`` (so ``serve deploy`` with a changed value reconfigures replicas in place); the
scaling part becomes the deployment's options (``num_replicas`` or ``autoscaling_config``,
``max_ongoing_requests``, ``max_queued_requests``, ``ray_actor_options``).

Admission control, in two stages so that slow senders cannot take the model's slots: a replica
receives at most ``max_uploads`` request bodies at once, each within ``body_timeout_s`` (408
beyond); a request whose body has arrived then takes one of ``max_inflight`` slots (decoding,
waiting for or running the model, encoding). A request that finds either stage full gets a JSON
503 with ``Retry-After`` at once. Serve's own ``max_ongoing_requests`` is set above both
(``max_uploads + max_inflight + ongoing_headroom``) so overflowing requests still reach a
replica and get that JSON answer; Serve's router queue (``max_queued_requests``) is only a last
resort (Serve answers it with a plain-text 503, which ``retry_after_s`` gives a ``Retry-After``
header through Serve's ``BackpressureConfig``).

Autoscaling fields are those of ``ray.serve.config.AutoscalingConfig`` (Ray 2.60):
``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ``upscale_delay_s``,
``downscale_delay_s``, ``look_back_period_s``, ``metrics_interval_s``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

# Autoscaling defaults: scale out when replicas average more than 2 ongoing requests, react
# within seconds up and half a minute down. Serve's own defaults (30 s up, 600 s down) suit
# large fleets; these suit one endpoint on a few nodes.
DEFAULT_AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 2.0,
    "upscale_delay_s": 5.0,
    "downscale_delay_s": 30.0,
}
AUTOSCALING_KEYS = frozenset(
    {
        "min_replicas",
        "max_replicas",
        "initial_replicas",
        "target_ongoing_requests",
        "upscale_delay_s",
        "downscale_delay_s",
        "look_back_period_s",
        "metrics_interval_s",
    }
)
# Fields sent to replicas as user_config (changing them reconfigures replicas in place).
REPLICA_FIELDS = (
    "model",
    "tracking_uri",
    "max_inflight",
    "max_uploads",
    "body_timeout_s",
    "max_body_bytes",
    "max_pixels",
    "min_side",
    "batching",
    "max_batch_size",
    "batch_wait_timeout_s",
    "retry_after_s",
    "reload_interval_s",
    "api_key_sha256",
    "api_key_env",
    "device",
    "torch_threads",
    "allow_flip",
    "allow_scales",
)


class SettingsError(ValueError):
    """A setting that cannot work; the message names it."""


@dataclass(frozen=True)
class ServeSettings:
    """Everything the endpoint can be told (see the module docstring)."""

    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, s3://... or a package directory
    tracking_uri: str | None = None  # MLflow for models:/ URIs; None: MLFLOW_TRACKING_URI
    # --- scaling (deployment options) ---
    num_replicas: int = 1  # fixed replica count, used when autoscaling is None
    autoscaling: dict[str, Any] | None = None  # AutoscalingConfig fields; None: fixed count
    num_cpus: float = 1.0  # logical CPUs per replica
    num_gpus: float = 0.0  # GPUs per replica (1 puts each replica on its own GPU)
    max_queued_requests: int = 64  # Serve's router queue per deployment, beyond: Serve's 503
    ongoing_headroom: int = 8  # max_ongoing_requests = max_uploads + max_inflight + this
    # --- request handling (user_config) ---
    max_inflight: int = 4  # requests a replica admits at once; beyond: JSON 503 + Retry-After
    max_uploads: int = 32  # request bodies a replica receives at once; beyond: JSON 503
    body_timeout_s: float = 30.0  # the whole body must arrive within this; beyond: 408
    retry_after_s: int = 1  # Retry-After of overload answers (seconds)
    max_body_bytes: int = 32 << 20  # request body cap (413 beyond)
    max_pixels: int = 4096 * 4096  # width x height cap, checked on the header (413 beyond)
    min_side: int | None = None  # smallest image side (422 below); None: probed from the model
    batching: bool | None = None  # dynamic batching; None: on with a GPU, off on CPU
    max_batch_size: int = 8  # images per batch
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    reload_interval_s: float = 30.0  # alias watch period for models:/NAME@ALIAS; 0: never
    api_key_sha256: str | None = None  # SHA-256 (hex) of the bearer key; None: no key needed
    api_key_env: str | None = None  # or: environment variable of the replicas holding the key
    device: str | None = None  # torch device; None: cuda with a GPU, else cpu
    torch_threads: int | None = None  # intra-op threads; None: the replica's CPUs (at least 1)
    allow_flip: bool = True  # clients may ask for flip=true|false
    allow_scales: bool = True  # clients may ask for scales=... (at most 3 in [0.5, 2])
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, ignored by the endpoint

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise SettingsError("model: a model URI is required")
        positive = ("max_inflight", "max_uploads", "max_body_bytes", "max_pixels", "max_batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be a positive integer, got {value!r}")
        if self.num_replicas < 1:
            raise SettingsError(f"num_replicas must be at least 1, got {self.num_replicas}")
        if self.min_side is not None and self.min_side < 1:
            raise SettingsError(f"min_side must be at least 1, got {self.min_side}")
        if not self.body_timeout_s > 0:
            raise SettingsError(f"body_timeout_s must be > 0, got {self.body_timeout_s!r}")
        if self.reload_interval_s < 0 or self.batch_wait_timeout_s < 0:
            raise SettingsError("reload_interval_s and batch_wait_timeout_s must be >= 0")
        if self.retry_after_s < 0 or self.ongoing_headroom < 0 or self.max_queued_requests < 1:
            raise SettingsError(
                "retry_after_s and ongoing_headroom must be >= 0, max_queued_requests >= 1"
            )
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise SettingsError("num_cpus must be > 0 and num_gpus >= 0")
        if self.api_key_sha256 is not None and (
            len(self.api_key_sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.api_key_sha256)
        ):
            raise SettingsError("api_key_sha256 must be 64 lowercase hex digits")
        if self.autoscaling is not None:
            unknown = sorted(set(self.autoscaling) - AUTOSCALING_KEYS)
            if unknown:
                raise SettingsError(
                    f"autoscaling: unknown field(s) {unknown}; valid: {sorted(AUTOSCALING_KEYS)}"
                )
            merged = {**DEFAULT_AUTOSCALING, **self.autoscaling}
            if not 0 <= merged["min_replicas"] <= merged["max_replicas"]:
                raise SettingsError(
                    f"autoscaling: need 0 <= min_replicas <= max_replicas, got "
                    f"{merged['min_replicas']} and {merged['max_replicas']}"
                )
            object.__setattr__(self, "autoscaling", merged)

    # ------------------------------------------------------------------------------ forms
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeSettings:
        """Settings from a mapping (``serve.yaml`` args, user_config); unknown keys refused."""
        if not isinstance(data, dict):
            raise SettingsError(f"settings must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SettingsError(f"unknown setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ServeSettings:
        return dataclasses.replace(self, **changes)

    def user_config(self) -> dict[str, Any]:
        """The request-handling fields, as the deployment's ``user_config``."""
        return {name: getattr(self, name) for name in REPLICA_FIELDS}

    @property
    def max_ongoing_requests(self) -> int:
        return self.max_uploads + self.max_inflight + self.ongoing_headroom

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for these settings."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "user_config": self.user_config(),
            "health_check_period_s": 5.0,
            "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": 10.0,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = dict(self.autoscaling)
        else:
            options["num_replicas"] = self.num_replicas
        if self.retry_after_s:
            options["backpressure_config"] = {"retry_after_s": self.retry_after_s}
        return options


def api_key_digest(key: str) -> str:
    """The ``api_key_sha256`` setting for bearer key ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()
