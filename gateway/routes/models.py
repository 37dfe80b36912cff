"""GET /v1/models and /v1/models/{model}, from the LLM service's GetModelInfo."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.errors import APIError
from gateway.protocol import ModelCard, ModelList
from gateway.served_model import ModelIdentity

router = APIRouter()


def _card(identity: ModelIdentity) -> ModelCard:
    return ModelCard(id=identity.name, created=identity.created,
                     max_model_len=identity.max_model_len or None)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    identity = await request.app.state.served_model.identity(refresh=True)
    return ModelList(data=[_card(identity)])


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> ModelCard:
    identity = await request.app.state.served_model.identity(refresh=True)
    if model not in (identity.name, identity.model_id):
        raise APIError(404, f"The model `{model}` does not exist.", param="model",
                       code="model_not_found")
    return _card(identity)
