"""APKG in, installed package out; never runs package code."""
