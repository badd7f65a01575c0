"""Run side: bundle reader, preprocessing, backends and the Detector API. Never imports torch."""
