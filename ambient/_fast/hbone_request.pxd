# Declarations of ambient/_fast/hbone_request.pyx, for other Cython modules (cimport).

cdef class SpiffeParts:
    cdef readonly str trust_domain
    cdef readonly str namespace
    cdef readonly str service_account

cpdef SpiffeParts split_spiffe(object identity)
cpdef tuple split_host_port(str authority)
cpdef list parse_forwarded(str value)
cpdef dict parse_baggage(str value)

cdef class StreamRequest:
    cdef readonly object peer_identity
    cdef readonly str authority
    cdef readonly str peer_address
    cdef readonly tuple headers
    cdef object _baggage
    cpdef object header(self, str name)

cdef class InboundDispatcher:
    cdef readonly object decide
