"""Tools to check the GPU code paths on a machine without a GPU: :mod:`fastsiam.testing.fake_cuda`."""
