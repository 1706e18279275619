/* header-only shim */
