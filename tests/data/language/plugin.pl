# A 1 MiB RAM disk as an nbdkit Perl plugin (tests/language_plugins.rs).
my $disk = "\0" x (1024 * 1024);

sub open {
    my $readonly = shift;
    return {};
}

sub get_size {
    return length ($disk);
}

sub pread {
    my ($h, $count, $offset, $flags) = @_;
    return substr ($disk, $offset, $count);
}

sub pwrite {
    my ($h, $buf, $offset, $flags) = @_;
    substr ($disk, $offset, length ($buf)) = $buf;
}

# Perl plugins are read-only unless they say otherwise.
sub can_write {
    return 1;
}
