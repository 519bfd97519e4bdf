pytest_plugins = ["tests.triton_fixtures"]
