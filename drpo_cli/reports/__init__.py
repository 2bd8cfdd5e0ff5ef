"""Reports: the JSON report schemas, the console view, the HTML pages and the options reference."""
