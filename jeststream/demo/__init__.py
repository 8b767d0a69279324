"""The embedded demo: JEST vs uniform on a noisy image-caption set built from sklearn digits."""
