"""`GET /metrics` (vLLM, SGLang, llama-server) and `GET /v1/metrics` (NIM): the same Prometheus page.

Open by default, as vLLM and NIM serve it: the page holds counts and latencies per served model and dialect,
never a key, a prompt, an account or a request id. An operator who does not want even that public sets
`--metrics-key` (DEEPSERVE_METRICS_KEY) and gives Prometheus the same token (`authorization` in its scrape
config); the key is separate from API and admin keys so the scraper holds no power over the service.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from starlette.responses import Response

from deepserve.api.auth import bearer_token
from deepserve.errors import AuthenticationError
from deepserve.observability.metrics import render_page

router = APIRouter(tags=["Operations"])


def _check_key(request: Request) -> None:
    expected = getattr(request.app.state.settings, "metrics_key", None)
    if not expected:
        return
    given = bearer_token(request) or ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthenticationError("The metrics page needs 'Authorization: Bearer <metrics key>'.")


@router.get("/metrics", summary="Prometheus metrics")
@router.get("/v1/metrics", summary="Prometheus metrics (NIM's path)")
async def metrics_page(request: Request) -> Response:
    _check_key(request)
    body, content_type = render_page(lambda: getattr(request.app.state, "models", None) or (),
                                     request.headers.get("accept"))
    return Response(body, media_type=None, headers={"Content-Type": content_type})
