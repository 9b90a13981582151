"""The only code that knows Envoy's protos: translate them to plain values and back."""
