"""The one model behind this gateway: the name clients use and the id the LLM service uses."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gateway.errors import APIError
from gateway.llm_client import LLMClient


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    name: str  # advertised in /v1/models and echoed in responses
    model_id: str  # what GenerateRequest.model carries
    max_model_len: int
    system_fingerprint: str | None
    created: int
    max_n: int = 0  # the engine's max_num_seqs; 0: unknown, the LLM service checks

    def check_output_limit(self, max_tokens: int | None, param: str) -> None:
        """400 for a limit no request can reach, instead of a generation that runs to the
        end of the context; smaller limits that do not fit next to the prompt are clamped."""
        if max_tokens is not None and 0 < self.max_model_len < max_tokens:
            raise APIError(400, f"{param}={max_tokens} is more than the model's context length "
                                f"(max_model_len {self.max_model_len}); ask for at most "
                                f"{self.max_model_len - 1} tokens", param=param)

    def check_n(self, n: int) -> None:
        """The engine's limit on choices, at the edge: before anything is sent on."""
        if 0 < self.max_n < n:
            raise APIError(400, f"n={n} exceeds the engine's max_num_seqs={self.max_n}; ask "
                                f"for at most {self.max_n} choices", param="n")

    def envelope(self, response_id: str) -> dict[str, Any]:
        """The fields every response and chunk of one request carries."""
        return {"id": response_id, "created": int(time.time()), "model": self.name,
                "system_fingerprint": self.system_fingerprint}


class ServedModel:
    """Asks the LLM service's GetModelInfo once and remembers the answer;
    `/v1/models` refreshes it."""

    def __init__(self, llm: LLMClient, advertised_name: str | None) -> None:
        self._llm = llm
        self._advertised_name = advertised_name
        self._identity: ModelIdentity | None = None

    async def identity(self, refresh: bool = False) -> ModelIdentity:
        if self._identity is None or refresh:
            info = await self._llm.model_info()
            self._identity = ModelIdentity(
                name=self._advertised_name or info.model_id,
                model_id=info.model_id,
                max_model_len=info.max_model_len,
                system_fingerprint=f"fp_{info.engine}" if info.engine else None,
                created=self._identity.created if self._identity else int(time.time()),
                max_n=info.max_num_seqs,
            )
        return self._identity

    async def resolve(self, requested: str | None) -> ModelIdentity:
        """The served model, or 404 when the request names another one."""
        identity = await self.identity()
        if requested is not None and requested not in (identity.name, identity.model_id):
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                                f"`{identity.name}`.", param="model", code="model_not_found")
        return identity
