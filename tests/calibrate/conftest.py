import pytest


@pytest.fixture(scope="session")
def accuracy_model():
    from gsa_compile.accuracy import load_accuracy_model

    return load_accuracy_model()
