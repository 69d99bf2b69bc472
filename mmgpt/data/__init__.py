"""Data: the digits task, user feature files, caption batching (Lightning-free), and the Lightning DataModules in
`mmgpt.data.modules` (what conf/data/*.yaml instantiates)."""
