"""Version swaps: rollout plans and the pure engine that walks them (rolling, blue-green,
canary, A/B), with rollback. The runtime drives an engine per rollout."""
