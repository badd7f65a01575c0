"""Thin command-line front ends over library functions."""
