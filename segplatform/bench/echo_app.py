"""P6's reference endpoint: a Serve deployment with a FastAPI ingress that does no work.

It answers ``POST /v1/segment`` with the first 2 kB of the body, so its latency is what any Serve
HTTP endpoint costs on the machine (HTTP proxy, routing, ASGI messages over Ray), the floor
under the segmentation endpoint's added latency. (No postponed annotations in this module:
FastAPI reads the handler's annotations as classes.)
"""

from fastapi import FastAPI, Request, Response
from ray import serve

app = FastAPI()


@serve.deployment(name="Echo", ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class Echo:
    @app.post("/v1/segment")
    async def echo(self, request: Request) -> Response:
        body = await request.body()
        return Response(body[:2048], media_type="image/png")


def echo_app() -> serve.Application:
    return Echo.bind()
