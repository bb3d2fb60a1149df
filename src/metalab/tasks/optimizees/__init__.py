"""Optimizee families of the learned optimizer: quadratic functions, an MNIST network."""
