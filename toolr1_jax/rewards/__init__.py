"""Rewards: GAIA exact scorer, judges (rule / OpenAI-compatible / local) and the total reward."""
