"""Episodic samplers (few-shot episodes of support and query sets): sinusoid, Omniglot, MiniImageNet."""
