"""Config sections of the reward sources beyond a model or a local function: a remote reward
service (``reward.remote``), weighted reward terms (``reward.terms``) and how the members of a
reward-model ensemble combine (``reward.ensemble``). ``config.RewardConfig`` holds them; the
service contract is in ``rlhf_ray.rewards.remote``."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, model_validator

from rlhf_ray.config.model_spec import ModelSpec
from rlhf_ray.config.sections import Section


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RemoteRewardConfig(Section):
    """A reward service: ``POST url`` with ``{"prompts", "responses"[, "metadata"]}``, answered
    ``{"scores": [float]}`` (see README, "Remote rewards")."""

    url: str = Field(description="The service endpoint, http:// or https://.")
    token_env: str | None = Field(
        None,
        description="Name of an environment variable holding a bearer token, sent as "
        "'Authorization: Bearer <token>' (null: no header).",
    )
    batch_size: int = Field(64, gt=0, description="Responses per request.")
    max_concurrency: int = Field(
        4, gt=0, description="Requests in flight at once, per reward replica."
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one request, in seconds.")
    max_retries: int = Field(
        5,
        ge=0,
        description="Retries of a request after a connection error, a timeout, 429 or 5xx, "
        "waiting backoff_s * 2^k (k = 0, 1, ...) times a random 1-1.5 between them.",
    )
    backoff_s: float = Field(1.0, gt=0, description="First wait before a retry, in seconds.")
    ca_bundle: str | None = Field(
        None,
        description="PEM file of the certificate authority (or the self-signed certificate) "
        "that the https:// service's certificate must chain to (null: the system's trust store).",
    )
    allow_token_over_http: bool = Field(
        False,
        description="Send the token to a non-loopback host over plain http:// (it travels in "
        "clear). Refused unless true: use https:// instead.",
    )

    @model_validator(mode="after")
    def _http_url(self) -> RemoteRewardConfig:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"url {self.url!r} must be an http:// or https:// URL with a host")
        if self.ca_bundle is not None and parsed.scheme != "https":
            raise ValueError(f"ca_bundle is set but url {self.url!r} is not https://")
        plain = parsed.scheme == "http" and not is_loopback(parsed.hostname or "")
        if plain and self.token_env is not None and not self.allow_token_over_http:
            raise ValueError(
                f"token_env {self.token_env!r} would send the token in clear over http:// to "
                f"the non-loopback host of url {self.url!r}: use https:// (or set "
                "allow_token_over_http=true)"
            )
        return self


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RewardTerm(Section):
    """A weighted extra term: ``total = main + sum(weight * term)``, each logged
    ``reward/<name>_mean``."""

    name: str = Field(description="Metric name of the term (letters, digits, '_'; not 'main').")
    weight: float = Field(description="Multiplies the term's score before it is added.")
    function: str | None = Field(
        None, description="'package.module:callable', called as a reward function."
    )
    remote: RemoteRewardConfig | None = Field(None, description="A reward service.")
    model: ModelSpec | None = Field(
        None,
        description="A reward model (e.g. RUN/reward_model of `rlhf-ray train-rm`), held by the "
        "reward actors beside the main one; its raw score is the term (reward.append_eos "
        "applies; a directory with its own tokenizer reads the text in it).",
    )
    kwargs: dict[str, float | int | str | bool] = Field(
        default_factory=dict,
        description="Fixed keyword arguments of `function` (e.g. {target: 40, unit: words} for "
        "rlhf_ray.rewards:length_penalty); a parameter given here is not read from a column.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RewardTerm:
        if not _NAME.match(self.name) or self.name == "main":
            raise ValueError(f"term name {self.name!r} must be an identifier other than 'main'")
        if sum(x is not None for x in (self.function, self.remote, self.model)) != 1:
            raise ValueError(
                f"term {self.name!r}: set exactly one of `function`, `remote` and `model`"
            )
        if self.kwargs and self.function is None:
            raise ValueError(f"term {self.name!r}: kwargs are a function's; set `function`")
        if self.function is not None and ":" not in self.function:
            raise ValueError(
                f"term {self.name!r}: function {self.function!r} must look like "
                "'package.module:callable'"
            )
        return self


class RewardEnsemble(Section):
    """How the scores of a list of reward models (``reward.model: [..]``) become one score per
    sample (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization")."""

    combine: Literal["mean", "min", "mean_minus_std"] = Field(
        "mean",
        description="'mean' of the members' scores, 'min' (worst case), or 'mean_minus_std': "
        "mean - k * std across members (uncertainty weighted; std with divisor M).",
    )
    k: float = Field(1.0, ge=0, description="mean_minus_std: the weight k of the std.")
    standardize: Literal["model", "none"] = Field(
        "model",
        description="Before combining, 'model' standardises each member with the train-set "
        "mean/std `rlhf-ray train-rm` stored with it (members trained with other seeds score "
        "on other scales: a Bradley-Terry model is defined up to a shift); 'none' combines raw "
        "scores.",
    )
