"""What several test packages share: tiny models, real servers, job control."""
