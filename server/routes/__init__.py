"""The HTTP surface, one FastAPI `APIRouter` per concern; `server.app.create_app` wires them.

health (liveness, readiness, metrics), generation (/v1/generate, /v1/perplexity), openai
(/v1/completions, /v1/models), var_admin (/var/toggle, /var/status, /admin/expert-load), capture (/admin/capture/*).
Test: `pytest tests/test_server_api.py`.
"""

from . import capture, generation, health, openai, var_admin

ROUTERS = (health.router, generation.router, openai.router, var_admin.router, var_admin.admin_router, capture.router)
