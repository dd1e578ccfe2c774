"""Development kit: the tiny trained target and synthetic chats for the quickstart and tests."""
