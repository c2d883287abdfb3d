"""The web layer: the dispatcher's aiohttp app and everything HTTP about it.

Owns routes and handlers (``server``), the reports API (``reports_api``), the OpenAPI
document (``openapi``), the mapping from failures to OpenAI-shaped HTTP errors
(``errors``), who may reach which route (``security``) and the dashboard page. Handlers
stay thin: what a call does is ``app.gateway``'s, what a budget allows ``app.budgets``'.
"""
