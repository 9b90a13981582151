"""Red team: generate benign and extraction traffic against the demo model, without any network.

:mod:`extauthz.redteam.traffic` holds the query generators (natural clients, uniform noise,
Tramèr line search, Papernot augmentation, Sybil splitting); callers send what they produce.
"""
