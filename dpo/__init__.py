"""Offline preference optimisation on the raw rankings: DPO under the Plackett-Luce model."""
