"""Run the demo: a small real model server, and the local stack of Envoy, guard and model.

The demo model (``extauthz.demo.model``) gives ``make demo``, the end-to-end tests and the red
team something real to protect: a digits classifier that answers KServe v1 and Open Inference v2.
"""
