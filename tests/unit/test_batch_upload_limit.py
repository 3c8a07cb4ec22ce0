"""EdgeMiddleware: /v1/files has its own body limit; every other path keeps the general one."""

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from api.errors import install_error_handlers
from api.middleware import EdgeMiddleware


def _client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, max_body_bytes=100, path_limits={"/v1/files": 1000})

    @app.post("/v1/files")
    @app.post("/v1/chat/completions")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return TestClient(app)


def test_upload_path_has_its_own_limit() -> None:
    client = _client()
    assert client.post("/v1/files", content=b"x" * 900).json() == {"bytes": 900}
    over = client.post("/v1/files", content=b"x" * 1001)
    assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"
    assert "1000 bytes" in over.json()["error"]["message"]
    chat = client.post("/v1/chat/completions", content=b"x" * 900)
    assert chat.status_code == 413 and "100 bytes" in chat.json()["error"]["message"]
