"""Shared bottom layer of ztdpu: model, configuration, identity. Imports only protos and third-party code."""
