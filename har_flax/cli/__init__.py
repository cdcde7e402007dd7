"""Console-script entry points (``har-*``): parse arguments, call the library, report errors."""
