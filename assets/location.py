"""The code location's entry point (workspace.yaml loads it): the one module that reads
the environment (``ASMWATCH_DATA``, ``ASMWATCH_REGIONS``, ``PC_SDK_SUBSCRIPTION_KEY``)."""

from assets.definitions import LocationConfig, build_definitions

defs = build_definitions(LocationConfig.from_environment())
