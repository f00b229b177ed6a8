"""A tiny pipeline with typed, defaulted parameters: what tests compile to exercise `pipelines.client`."""

from kfp import dsl


@dsl.component(base_image="python:3.11")
def repeat(message: str, times: int, scale: float, loud: bool) -> str:
    text = message * times
    return text.upper() if loud else text


@dsl.pipeline(name="toy-pipeline", description="Repeats a message; for tests only.")
def toy_pipeline(message: str = "hi", times: int = 2, scale: float = 0.5, loud: bool = False,
                 tags: list = ["a"], options: dict = {"k": 1}):  # noqa: B006 -- KFP compiles defaults, never mutates
    repeat(message=message, times=times, scale=scale, loud=loud)
