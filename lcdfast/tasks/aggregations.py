"""Aggregations the shipped task configs name with `!function aggregations.NAME`."""

import math


def perplexity(items: list[float]) -> float:
    """exp(-mean log-likelihood); inf where that overflows a float: a contrast scored with DoLa's relative-top mask
    gives each token outside its plausible set -1000."""
    try:
        return math.exp(-sum(items) / len(items))
    except OverflowError:
        return math.inf


def weighted_perplexity(items: list[tuple[float, int]]) -> float:
    """exp(-sum of log-likelihoods / sum of words or bytes); inf where that overflows a float."""
    try:
        return math.exp(-sum(ll for ll, _ in items) / sum(n for _, n in items))
    except OverflowError:
        return math.inf
