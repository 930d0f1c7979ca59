"""Peer frameworks measured on the same training as tinytrain, each in its own process.

The peer scripts are standalone (they import neither tinytrain nor its extension) so they can run
under whichever interpreter has the peer installed, e.g. Debian's python3 with python3-torch.
"""
