"""Helpers shared by the tests and the benchmarks (never shipped): throwaway meshes, Redis servers, fixtures."""
