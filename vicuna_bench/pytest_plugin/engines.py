"""The engine fixtures: one engine per distinct spec for the whole session (per xdist worker), closed at its end."""

from __future__ import annotations

import pytest

from .options import group_values


class EngineFactory:
    """One engine per distinct spec (and workers choice) for the whole session."""

    def __init__(self):
        self._engines: dict = {}

    def __call__(self, spec, workers: bool | None = None):
        from ..drivers import open_engine

        key = (spec, workers)
        engine = self._engines.get(key)
        if engine is None or engine.closed:
            engine = open_engine(spec, workers=workers)
            self._engines[key] = engine
        return engine

    def close(self):
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()


@pytest.fixture(scope="session")
def engine_factory():
    factory = EngineFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def engine_spec(pytestconfig):
    """The EngineSpec the options describe (--model-path, --world-size, ...; no work ahead: --compile auto is off)."""
    from ..drivers import resolve_spec

    return resolve_spec(group_values(pytestconfig, "model"), progress=False)


@pytest.fixture(scope="session")
def engine(engine_factory, engine_spec):
    """The engine the options describe (--model-path, --world-size, ...)."""
    return engine_factory(engine_spec)
