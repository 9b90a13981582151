"""Load benchmarks: Envoy alone, Envoy + a no-op ext_authz server, Envoy + extauthz's Check."""
