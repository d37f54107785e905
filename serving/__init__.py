"""OpenAI-compatible serving of a twin artifact: arms, routing, A/B aliases, and a backend per engine.

    twinrt serve ARTIFACT [--ab twin=50,core=50] [--api-key KEY]       # see docs/SERVING.md
    python -m serving.demo                                             # the SmolLM2 demo

serving.server builds and runs a server; serving.app is the FastAPI app; serving.completions the request flow;
serving.backends the engines behind it. Heavy dependencies (torch, transformers, fastapi) load on use.
"""
