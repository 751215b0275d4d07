-- A 1 MiB RAM disk as an nbdkit Lua plugin (tests/language_plugins.rs).
disk = string.rep ("\0", 1024 * 1024)

function open (readonly)
   return {}
end

function get_size (h)
   return disk:len ()
end

function pread (h, count, offset)
   return disk:sub (offset + 1, offset + count)
end

function pwrite (h, buf, offset)
   disk = disk:sub (1, offset) .. buf .. disk:sub (offset + buf:len () + 1)
end
