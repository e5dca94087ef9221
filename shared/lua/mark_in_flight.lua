-- Charges a run to each image still running: if the process dies now, these (and only these) were in
-- flight. A record that expired or finished meanwhile is left alone (HINCRBY would recreate it).
-- KEYS: the records of the images about to be decoded and run in one forward pass.
-- O: alone (the pass holds one image alone). Returns the number of keys.
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'status') == M.st.running then
    redis.call('HINCRBY', KEYS[i], 'runs', 1)
    if O.alone then redis.call('HINCRBY', KEYS[i], 'alone_runs', 1) end
  end
end
return #KEYS
