"""Knowledge bases and their documents: upload, status, versions, delete."""
