"""Tests with lmcache 0.5.6's real client, against its own server and lmcd."""
