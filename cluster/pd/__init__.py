"""Disaggregation between engine cores: the decode side, the prefill side, pair health."""
